"""The MusicGen decoder as plain tensor code: `prefill` and `decode_one_step` over a KV cache.

It reads the weights of a loaded `transformers` MusicGen decoder (nothing is copied but the
fused self-attention projection) and runs the same maths as `MusicgenDecoder.forward`:

    x = sum_k embed_k(ids_k) + sinusoid(position)
    per layer:  x += self_attn(LN(x));  x += cross_attn(LN(x), text);  x += fc2(gelu(fc1(LN(x))))
    logits_k = head_k(LN(x))

Rows of the batch are [conditional..., null...] for classifier-free guidance. Cross-attention
keys/values depend only on the prompt, so `cross_kv` computes them once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


@dataclass
class LayerWeights:
    ln_self: tuple[torch.Tensor, torch.Tensor]  # weight, bias [E]
    qkv: torch.Tensor  # [3E, E] fused self-attention projection
    out_self: torch.Tensor  # [E, E]
    ln_cross: tuple[torch.Tensor, torch.Tensor]
    q_cross: torch.Tensor  # [E, E]
    k_cross: torch.Tensor  # [E, E_text]
    v_cross: torch.Tensor  # [E, E_text]
    out_cross: torch.Tensor  # [E, E]
    ln_ffn: tuple[torch.Tensor, torch.Tensor]
    fc1: torch.Tensor  # [F, E]
    fc2: torch.Tensor  # [E, F]


@dataclass
class CrossKV:
    """Per-layer cross-attention keys/values of one prompt batch, and the text mask."""

    keys: list[torch.Tensor]  # L x [B, H, S, D]
    values: list[torch.Tensor]  # L x [B, H, S, D]
    mask: torch.Tensor  # [B, 1, 1, S] bool, True = attend


def _ln(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight, module.bias


class Decoder:
    def __init__(self, causal_lm) -> None:
        """`causal_lm`: a transformers `MusicgenForCausalLM` (model.decoder of the full model)."""
        dec = causal_lm.model.decoder
        config = causal_lm.config
        self.num_codebooks = config.num_codebooks
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.max_positions = config.max_position_embeddings
        self.activation = dec.layers[0].activation_fn
        self.embed = [e.weight for e in dec.embed_tokens]  # K x [V + 1, E]
        self.positions = dec.embed_positions.weights  # [max_positions, E]
        self.final_ln = _ln(dec.layer_norm)
        self.lm_heads = torch.stack([h.weight for h in causal_lm.lm_heads])  # [K, V, E]
        self.layers = [
            LayerWeights(
                ln_self=_ln(layer.self_attn_layer_norm),
                qkv=torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ]
                ),
                out_self=layer.self_attn.out_proj.weight,
                ln_cross=_ln(layer.encoder_attn_layer_norm),
                q_cross=layer.encoder_attn.q_proj.weight,
                k_cross=layer.encoder_attn.k_proj.weight,
                v_cross=layer.encoder_attn.v_proj.weight,
                out_cross=layer.encoder_attn.out_proj.weight,
                ln_ffn=_ln(layer.final_layer_norm),
                fc1=layer.fc1.weight,
                fc2=layer.fc2.weight,
            )
            for layer in dec.layers
        ]
        self.device = self.lm_heads.device
        self.dtype = self.lm_heads.dtype

    def new_cache(self, batch: int, max_positions: int) -> KVCache:
        return KVCache(
            len(self.layers),
            batch,
            self.heads,
            max_positions,
            self.head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    def cross_kv(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> CrossKV:
        """text_states: [B, S, E] projected and masked; text_mask: [B, S] bool."""
        b, s, _ = text_states.shape
        split = (b, s, self.heads, self.head_dim)
        keys = [F.linear(text_states, w.k_cross).view(split).transpose(1, 2) for w in self.layers]
        values = [F.linear(text_states, w.v_cross).view(split).transpose(1, 2) for w in self.layers]
        return CrossKV(keys, values, text_mask[:, None, None, :])

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids: [B, K, T] -> [B, T, E] token embeddings summed over codebooks, plus positions."""
        x = sum(F.embedding(ids[:, k], self.embed[k]) for k in range(self.num_codebooks))
        return x + self.positions[start : start + ids.shape[-1]]

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.hidden)  # [B, T, E]

    def forward(
        self, ids: torch.Tensor, start: int, cache: KVCache, cross: CrossKV
    ) -> torch.Tensor:
        """Run positions [start, start + T) and return hidden states [B, T, E] after the final norm.

        ids: [B, K, T]. T > 1 (a prefill) must start at position 0; T == 1 is one decoding step.
        """
        t = ids.shape[-1]
        assert t == 1 or start == 0, "multi-position forward is a prefill and starts at 0"
        x = self._embed(ids, start)
        end = start + t
        for i, w in enumerate(self.layers):
            h = F.layer_norm(x, (self.hidden,), *w.ln_self)
            q, k, v = F.linear(h, w.qkv).chunk(3, dim=-1)
            cache.write(i, start, self._split_heads(k), self._split_heads(v))
            keys, values = cache.view(i, end)
            a = F.scaled_dot_product_attention(self._split_heads(q), keys, values, is_causal=t > 1)
            x = x + F.linear(self._merge_heads(a), w.out_self)

            h = F.layer_norm(x, (self.hidden,), *w.ln_cross)
            q = self._split_heads(F.linear(h, w.q_cross))
            a = F.scaled_dot_product_attention(
                q, cross.keys[i], cross.values[i], attn_mask=cross.mask
            )
            x = x + F.linear(self._merge_heads(a), w.out_cross)

            h = F.layer_norm(x, (self.hidden,), *w.ln_ffn)
            x = x + F.linear(self.activation(F.linear(h, w.fc1)), w.fc2)
        cache.length = end
        return F.layer_norm(x, (self.hidden,), *self.final_ln)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, E] -> float32 logits [B, K, V]."""
        return torch.einsum("be,kve->bkv", hidden, self.lm_heads).float()

    def prefill(self, ids: torch.Tensor, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """ids: [B, K, T] from position 0. Returns logits [B, K, V] predicting position T."""
        cache.reset()
        hidden = self.forward(ids, 0, cache, cross)
        return self.logits(hidden[:, -1])

    def decode_one_step(self, ids: torch.Tensor, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """ids: [B, K] at position cache.length. Returns logits [B, K, V] for the next position."""
        hidden = self.forward(ids[:, :, None], cache.length, cache, cross)
        return self.logits(hidden[:, -1])
