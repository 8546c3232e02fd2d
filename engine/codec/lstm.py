"""EnCodec's LSTM run one frame at a time, so that the state after every frame is kept (the
streaming decoder saves it to resume and rewind exactly), and the recurrent weights in float16.

Per layer, the input projection of all frames of a call is one matmul (it does not depend on
h); only `W_hh h` runs per frame. For musicgen's codec (2 layers, hidden 1024) W_hh is 16 MB a
layer in float32, read whole for every frame: that product is bound by memory bandwidth, and
the decoder step that runs between two codec calls evicts it from the caches. Rounded to
float16 (`round_lstm_weights`, once at load, in the model itself so that the one-shot decode
reads the same weights), the C++ kernel (`lstm_f16.h`) reads half the bytes and converts on
the fly (F16C), and a layer's 8 MB stay in the last-level cache across the frames of a call.
Weights that are not float16 values, or a CPU without the kernel, run PyTorch's float32 ops on
the same weights: the decode is then as exact, only slower.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from engine.codec import native
from engine.codec.layers import dense

FLOAT16_MAX = 65504.0


def lstms(audio_encoder: nn.Module) -> list[tuple[str, nn.LSTM]]:
    """The codec decoder's LSTMs with their names (musicgen's EnCodec: one, of 2 layers)."""
    return [
        (f"decoder.{name}", m)
        for name, m in audio_encoder.decoder.named_modules()
        if isinstance(m, nn.LSTM)
    ]


def round_lstm_weights(audio_encoder: nn.Module) -> None:
    """Round the recurrent weights W_hh of the codec decoder's LSTM to float16 values, in place
    (they stay float32 tensors): every decode of this model, streamed or one-shot, then reads the
    same weights, and the streaming decoder's kernel reads them as float16."""
    for name, lstm in lstms(audio_encoder):
        for layer in range(lstm.num_layers):
            weight = getattr(lstm, f"weight_hh_l{layer}")
            peak = float(weight.detach().abs().max())
            if peak > FLOAT16_MAX:
                raise ValueError(
                    f"{name}.weight_hh_l{layer}: |w| reaches {peak:g}, beyond float16's range"
                )
            with torch.no_grad():
                weight.copy_(weight.half().float())


# Float16 copies of W_hh in the kernel's layout, made once per LSTM (shared by every decoder of
# a codec): the LSTM module -> (the weights' versions when made, [4H, H] per layer, or None).
_FLOAT16: weakref.WeakKeyDictionary[nn.LSTM, tuple] = weakref.WeakKeyDictionary()


def _float16_unit_major(lstm: nn.LSTM) -> list[torch.Tensor] | None:
    """Each layer's W_hh [4H, H] (gate-major i|f|g|o) as float16 [4H, H] unit-major (row 4j + q
    = gate q of unit j), if every weight is a float16 value; else None."""
    weights = [getattr(lstm, f"weight_hh_l{i}").detach() for i in range(lstm.num_layers)]
    # inference tensors (a model loaded under torch.inference_mode) have no version counter
    versions = tuple(None if w.is_inference() else w._version for w in weights)
    cached = _FLOAT16.get(lstm)
    if cached is not None and cached[0] == versions:
        return cached[1]
    packed: list[torch.Tensor] = []
    for w in weights:
        half = w.half()
        if not torch.equal(half.float(), w):
            _FLOAT16[lstm] = (versions, None)
            return None
        h = w.shape[1]
        packed.append(half.view(4, h, h).transpose(0, 1).reshape(4 * h, h).contiguous())
    _FLOAT16[lstm] = (versions, packed)
    return packed


class FrameLSTM:
    """`nn.LSTM` (no projection, not bidirectional) run frame by frame; same weights, same gate
    order (i, f, g, o). `float16`: whether the recurrence runs the float16 kernel."""

    def __init__(self, lstm: nn.LSTM):
        if lstm.bidirectional or lstm.proj_size or lstm.batch_first or not lstm.bias:
            raise ValueError("audio_encoder LSTM must be a plain unidirectional nn.LSTM with bias")
        self.layers = lstm.num_layers
        self.hidden = lstm.hidden_size
        with torch.no_grad():  # plain tensors: no autograd history kept alive by the decoder
            self.w_ih = [getattr(lstm, f"weight_ih_l{i}").detach() for i in range(self.layers)]
            self.w_hh = [getattr(lstm, f"weight_hh_l{i}").detach() for i in range(self.layers)]
            self.bias = [
                getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")
                for i in range(self.layers)
            ]
        cpu = self.w_hh[0].is_cpu and self.w_hh[0].dtype == torch.float32
        w16 = _float16_unit_major(lstm) if cpu and self.hidden % 16 == 0 else None
        self._kernel = native.get() if w16 is not None else None
        self._w16 = w16 if self._kernel is not None else None

    @property
    def float16(self) -> bool:
        return self._w16 is not None

    def run(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, B, D], h0/c0 [layers, B, H] -> (top-layer outputs [n, B, H],
        h and c after every frame [n, layers, B, H])."""
        n, b, H = x.shape[0], x.shape[1], self.hidden
        hs = x.new_empty(n, self.layers, b, H)
        cs = x.new_empty(n, self.layers, b, H)
        inp = x
        for layer in range(self.layers):
            pre = dense(inp.reshape(n * b, -1), self.w_ih[layer], self.bias[layer])
            pre = pre.view(n, b, 4 * H)  # input projection and biases of every frame
            if self._w16 is not None and self._kernel is not None:
                h, c = h0[layer].contiguous(), c0[layer].contiguous()
                self._kernel.lstm_layer(pre, self._w16[layer], h, c, hs[:, layer], cs[:, layer])
            else:
                self._recur(pre, self.w_hh[layer], h0[layer], c0[layer], hs[:, layer], cs[:, layer])
            inp = hs[:, layer]
        return hs[:, -1], hs, cs

    def _recur(
        self,
        pre: torch.Tensor,
        w_hh: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        hs: torch.Tensor,
        cs: torch.Tensor,
    ) -> None:
        """The recurrence in float32 PyTorch ops: pre [n, B, 4H] -> hs, cs [n, B, H]."""
        H = self.hidden
        for t in range(pre.shape[0]):
            gates = dense(h, w_hh).add_(pre[t])  # [B, 4H]
            s = gates.sigmoid()
            c = s[:, H : 2 * H] * c + s[:, :H] * gates[:, 2 * H : 3 * H].tanh()
            h = s[:, 3 * H :] * c.tanh()
            hs[t] = h
            cs[t] = c
