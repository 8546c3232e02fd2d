"""The MusicGen decoder as plain tensor code: `prefill` and `decode_one_step` over a KV cache.

It reads the weights of a loaded MusicGen decoder (`engine.musicgen`, or transformers' own;
nothing is copied but the fused self-attention projection) and runs the same maths as
transformers' `MusicgenDecoder.forward`:

    x = sum_k embed_k(ids_k) + sinusoid(position)
    per layer:  x += self_attn(LN(x));  x += cross_attn(LN(x), text);  x += fc2(gelu(fc1(LN(x))))
    logits_k = head_k(LN(x))

Rows of the batch are [conditional..., null...] for classifier-free guidance. Cross-attention
keys/values depend only on the prompt, so `cross_kv` computes them once per prompt.

The layers are written once (`_layers`); what differs is how a step attends to its own past:
a prefill attends causally to the keys it writes; a decode step on our CPU kernels runs their
one-call step (`engine/kernels/decode_step.h`) or their attention; any other decode step is
`step_logits`, shape-static (keys/values written at tensor positions, attention over the
cache's slots with the mask `arange(P) <= position[row]`), the function the GPU's compiled step
(`engine.static_step`) compiles as it is over the whole preallocated cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from engine.conditioning import Bf16Products, linear_bf16_weights
from engine.kv_cache import Q4_HEAD, KVCache
from engine.linear import (
    DECODER_PRECISIONS,
    INT4_GROUP,
    Int4KernelLinear,
    Int8KernelLinear,
    KernelModules,
    Projection,
    make_linear,
    projection_precision,
)
from engine.memory import HugePages, huge_pages
from engine.settings import TEXT_BFLOAT16, Resolved, for_decoder

if TYPE_CHECKING:
    from transformers import MusicgenForCausalLM
    from transformers.models.musicgen.modeling_musicgen import MusicgenDecoderLayer

    from engine.musicgen import DecoderLayer, MusicgenDecoder


@dataclass
class LayerWeights:
    """One decoder layer. Projections are callables (`engine.linear`), x [..., in] -> [..., out]."""

    ln_self: tuple[torch.Tensor, torch.Tensor]  # weight, bias [E]
    qkv: Projection  # E -> 3E, fused self-attention projection
    out_self: Projection  # E -> E
    ln_cross: tuple[torch.Tensor, torch.Tensor]
    q_cross: Projection  # E -> E
    k_cross: torch.Tensor  # [E, E_text], used once per prompt
    v_cross: torch.Tensor  # [E, E_text], used once per prompt
    out_cross: Projection  # E -> E
    q_cross_weight: torch.Tensor  # [E, E]: q_cross's and out_cross's own weights, folded into
    out_cross_weight: torch.Tensor  # the text once per prompt (`Decoder.cross_kv`)
    ln_ffn: tuple[torch.Tensor, torch.Tensor]
    fc1: Projection  # E -> F
    fc2: Projection  # F -> E


@dataclass
class TextWeights:
    """One layer's weights that a prompt's text goes through once per prompt (`cross_kv`), in
    the dtype those products run in."""

    k: torch.Tensor  # [E, E_text]: k_cross
    v: torch.Tensor  # [E, E_text]: v_cross
    # [H, D, E]: q_cross's and out_cross's (transposed) weights per head; for our kernel
    # (text products "bfloat16-weights": `matmul_panels`) in panels of 8 features
    # [H, E / 8, D, 8] (`panels`)
    q: torch.Tensor
    out: torch.Tensor


# a decoder's weights as a step uses them: (layers, prefill layers, lm heads, fused step)
WeightSet = tuple[list["LayerWeights"], list["LayerWeights"], "Projection", "FusedStep | None"]


def panels(weights: torch.Tensor) -> torch.Tensor:
    """[G, K, N] -> [G, ceil(N / 8), K, 8], the last panel zero padded: the layout of our
    `matmul_panels` kernel (each panel's 8 features contiguous over K)."""
    g, k, n = weights.shape
    p = -(-n // 8)
    padded = F.pad(weights, (0, 8 * p - n))
    return padded.view(g, k, p, 8).permute(0, 2, 1, 3).contiguous()


class FusedStep(Protocol):
    """Our one-call decode step (`engine.kernels` DecodeStepInt8): ids, positions, the cache's
    tensors and `CrossKV.stacked()` -> logits [B, K * V]."""

    def step(self, *inputs: torch.Tensor) -> torch.Tensor: ...  # an int8 cache

    def step_q4(self, *inputs: torch.Tensor) -> torch.Tensor: ...  # an int4 cache

    def clock_parts(self, on: bool) -> None: ...  # decode_step.h PartClock

    def part_times(self) -> list[tuple[str, float, int, int]]: ...


# The folded vectors cost more time per byte than the projections' weights (each int8 converted
# to float before its product: ~28 GB/s on two Zen 4 threads, against ~47 for the projections'
# VNNI products), so rows fold only while their vectors are under this share of the weights'
# bytes: three musicgen-small stations of 19 tokens, folded at 90% of the weights, were x0.97.
FOLD_SHARE = 2 / 3


@dataclass
class Folded:
    """Cross-attention folded into the text of some rows (`Decoder.cross_kv`): per row, head and
    text position z = W_q,h^T k / sqrt(D), then u = W_o[:, h] v, as `vectors` [L, B, H, 2, S, E]
    int8 with a float32 scale per vector, `scales` [L, B, H, 2, S]; `rows` [B] bool: the rows
    folded (the others' entries are zero; they read the projections)."""

    vectors: torch.Tensor
    scales: torch.Tensor
    rows: torch.Tensor

    @staticmethod
    def unset(layers: int, rows: int, heads: int, positions: int, hidden: int) -> Folded:
        """Room for every row's vectors, none folded yet. The vectors are left as allocated
        (39 MB zeroed for two rows of a 25-token prompt took ~11 ms): the step reads only the
        rows `put` folded, and a text position another part pads (`CrossKV.folded_inputs`)
        has a scale of 0 and a bias of -inf."""
        shape = (layers, rows, heads, 2, positions)
        return Folded(
            torch.empty(*shape, hidden, dtype=torch.int8),
            torch.zeros(shape),
            torch.zeros(rows, dtype=torch.bool),
        )

    def put(
        self,
        layer: int,
        rows: torch.Tensor,
        vectors: torch.Tensor,
        kernels: ModuleType | None = None,
    ) -> None:
        """float32 vectors [len(rows), H, 2, S, E] of `layer` as int8, each scaled by its
        largest magnitude / 127: in one pass by our kernels' `quantize_int8` where given, else
        by PyTorch's ops."""
        flat = vectors.reshape(-1, vectors.shape[-1])
        if kernels is not None:
            codes, scales = kernels.quantize_int8(flat)
        else:
            scales = flat.abs().amax(dim=-1) / 127
            codes = torch.round(flat / scales.clamp(min=1e-30)[:, None]).to(torch.int8)
        at = rows.tolist()
        if at == list(range(at[0], at[0] + len(at))):  # (a plain copy: index_copy_ on int8 ran
            place = slice(at[0], at[0] + len(at))  # at ~2 GB/s, 24 ms of a 25-token prompt's)
            self.vectors[layer, place] = codes.view(vectors.shape)
            self.scales[layer, place] = scales.view(vectors.shape[:-1])
        else:
            self.vectors[layer].index_copy_(0, rows, codes.view(vectors.shape))
            self.scales[layer].index_copy_(0, rows, scales.view(vectors.shape[:-1]))
        self.rows[rows] = True


NOT_FOLDED = Folded(torch.empty(0, dtype=torch.int8), torch.empty(0), torch.empty(0, dtype=bool))


@dataclass(frozen=True)
class FoldLater:
    """Rows `Decoder.cross_kv` chose to fold and left to `Decoder.fold`: `rows` [N] (row
    indices) and, per layer, the keys and values [B, H, S, D] as projected, before their
    rounding (what the fold reads)."""

    rows: torch.Tensor
    projected: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CrossKV:
    """Per-layer cross-attention keys/values of one prompt batch, and the text mask."""

    keys: list[torch.Tensor]  # L x [B, H, S, D]
    values: list[torch.Tensor]  # L x [B, H, S, D]
    mask: torch.Tensor  # [B, 1, 1, S] bool, True = attend
    # for our fused step: the attention folded into the text of some rows, per group of rows
    # that has any, (its first row, Folded) (`Decoder.cross_kv`); joined by `folded_inputs`
    folded: list[tuple[int, Folded]] = field(default_factory=list)
    # rows that fold, not folded yet (`cross_kv(..., fold=False)`): `Decoder.fold` does it
    fold_later: FoldLater | None = None
    _stacked: tuple[torch.Tensor, ...] | None = None
    _folded: Folded | None = None
    _folded_read: tuple[int, bool] | None = None

    def folded_inputs(self) -> Folded:
        """The folded parts as one Folded of every row (each text zero-padded to S: a padded
        position's bias is -inf, it weighs nothing), built once; NOT_FOLDED when none is."""
        if not self.folded:
            return NOT_FOLDED
        if self._folded is None:
            rows = self.mask.shape[0]
            first, part = self.folded[0]
            if len(self.folded) == 1 and first == 0 and part.rows.shape[0] == rows:
                self._folded = part
            else:
                layers, _, heads, _, _, hidden = part.vectors.shape
                joined = Folded.unset(layers, rows, heads, self.mask.shape[-1], hidden)
                for first, p in self.folded:
                    end, s = first + p.rows.shape[0], p.vectors.shape[4]
                    joined.vectors[:, first:end, :, :, :s] = p.vectors
                    joined.scales[:, first:end, :, :, :s] = p.scales
                    joined.rows[first:end] = p.rows
                self._folded = joined
        return self._folded

    def folded_read(self) -> tuple[int, bool]:
        """(text positions of the folded rows, whether another row reads text through the
        projections): what a fused step over these inputs reads for its cross-attention."""
        if self._folded_read is None:
            lengths = self.stacked()[3]
            folded = torch.zeros(lengths.shape[0], dtype=torch.bool)
            for first, p in self.folded:
                folded[first : first + p.rows.shape[0]] = p.rows
            projected = bool(((lengths > 0) & ~folded).any())
            self._folded_read = (int(lengths[folded].sum()), projected)
        return self._folded_read

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """The inputs of our fused decode step, built once per prompt: (keys, values)
        [L, B, H, S, D] bfloat16 (a fused decoder's are bfloat16 values from the start:
        `Decoder.cross_kv`), an additive mask [B, S] (0 or -inf), and how many text
        positions each row reads [B]: its tokens when they come first (padding after them
        weighs nothing), none for a row whose values are all zero (guidance's null rows, an
        empty prompt: their output is exactly zero), else all S."""
        if self._stacked is None:
            mask = self.mask[:, 0, 0].cpu()
            bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
            values = torch.stack(self.values).to(torch.bfloat16).contiguous()
            tokens = mask.sum(dim=-1)
            prefix = (torch.arange(mask.shape[-1]) < tokens[:, None]) == mask
            lengths = torch.where(prefix.all(dim=-1), tokens, mask.shape[-1])
            zero = values.abs().amax(dim=(0, 2, 3, 4)).cpu() == 0
            self._stacked = (
                torch.stack(self.keys).to(torch.bfloat16).contiguous(),
                values,
                bias,
                torch.where(zero, 0, lengths).long(),
            )
        return self._stacked


def concat_cross(parts: list[CrossKV]) -> CrossKV:
    """Groups of rows' cross-attention inputs as one batch, rows in order, each text zero-padded
    to the longest: what `Decoder.cross_kv` gives for their states stacked that way (the
    projections have no bias, so padding's keys and values are zero, and it is masked out),
    without reading the projections' weights again (~60-100 ms for musicgen-small's float32
    ones, at every window restart of every station while warm rows come and go)."""
    if len(parts) == 1:
        return parts[0]
    longest = max(p.mask.shape[-1] for p in parts)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B, H, longest, D]
        return F.pad(x, (0, 0, 0, longest - x.shape[2]))

    layers = range(len(parts[0].keys))
    folded, row = [], 0
    for p in parts:
        folded += [(row + first, f) for first, f in p.folded]
        row += p.mask.shape[0]
    return CrossKV(
        [torch.cat([padded(p.keys[i]) for p in parts]) for i in layers],
        [torch.cat([padded(p.values[i]) for p in parts]) for i in layers],
        torch.cat([F.pad(p.mask, (0, longest - p.mask.shape[-1]), value=False) for p in parts]),
        folded,
    )


PROJECTIONS = ("qkv", "out_self", "q_cross", "out_cross", "fc1", "fc2")  # a layer's, by name

log = logging.getLogger(__name__)


def packed_weights(
    layers: Sequence[LayerWeights], lm_heads: Projection | None = None
) -> list[torch.Tensor]:
    """The packed weights and scales of our kernels' projections (`pack_int8`, `pack_int4`):
    what a decode step streams from memory, every byte once a step."""
    projections = [*(getattr(w, name) for w in layers for name in PROJECTIONS), lm_heads]
    return [t for p in projections for t in packed_tensors(p)]


def packed_tensors(projection: Projection | None) -> list[torch.Tensor]:
    """One projection's packed weights and scales where our kernels read it (else none)."""
    parts = (getattr(projection, "packed", None), getattr(projection, "scales", None))
    return [t for t in parts if isinstance(t, torch.Tensor)]


def in_huge_pages(
    what: str, layers: Sequence[LayerWeights], lm_heads: Projection, spent: float = 0.0
) -> HugePages:
    """The packed weights of `layers` and `lm_heads` moved into 2 MB pages
    (`engine.memory.huge_pages`: a step's page walks), said in the log as `what` (with `spent`
    seconds of moving them before)."""
    began = time.perf_counter()
    pages = huge_pages(packed_weights(layers, lm_heads))
    if pages.made:
        log.info(
            "%s in 2 MB pages: %d of %d MB in %.0f ms (a step streams them: fewer page walks)",
            what,
            pages.made >> 20,
            pages.whole >> 20,
            1000 * (spent + time.perf_counter() - began),
        )
    if pages.refused and pages.whole > pages.made:
        log.info(
            "%s: %d MB stay in 4 KB pages: %s",
            what,
            (pages.whole - pages.made) >> 20,
            pages.refused,
        )
    return pages


def projection_bytes(p: object) -> int:
    """Bytes of weights a projection reads per step: our kernels' packed layouts with their
    scales, dense weights, or PyTorch's int8 (fbgemm: a byte a weight, a float32 scale a row)."""
    packed, scales = getattr(p, "packed", None), getattr(p, "scales", None)
    if isinstance(packed, torch.Tensor) and isinstance(scales, torch.Tensor):
        return packed.nbytes + scales.nbytes
    weight = getattr(p, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.nbytes
    out, inputs = getattr(p, "out_features", None), getattr(p, "in_features", None)
    return out * (inputs + 4) if isinstance(out, int) and isinstance(inputs, int) else 0


def _exact_gelu(fn: torch.nn.Module) -> bool:
    """Whether an activation module is the exact (erf) GELU, the one our fused step computes."""
    if isinstance(fn, torch.nn.GELU):
        return fn.approximate == "none"
    # transformers' GELUActivation (its "gelu"), named rather than imported: importing
    # transformers costs seconds a radio's start does not need (`engine.checkpoint`)
    return type(fn).__name__ == "GELUActivation" and getattr(fn, "act", None) is F.gelu


FUSED_PROJECTIONS = (Int8KernelLinear, Int4KernelLinear)  # the kinds our fused step takes


def kernel_projection(kernels: ModuleType, linear: Projection) -> object:
    """A projection's weights as our fused step takes them (`engine.kernels` Projection): int8
    (`pack_int8`'s bytes and scales) or int4 (`pack_int4`'s codes, scales and offsets; the
    group is the codes' inputs over the scales' groups)."""
    if isinstance(linear, Int8KernelLinear):
        kind = "int8"
    elif isinstance(linear, Int4KernelLinear):
        kind = "int4"
    else:
        raise TypeError(
            f"the fused step takes int8 or int4 projections, not {type(linear).__name__}"
        )
    return kernels.Projection(
        kind=kind, data=linear.packed, scales=linear.scales, out_features=linear.out_features
    )


def kernel_layer(kernels: ModuleType, w: LayerWeights) -> object:
    """A layer's weights by name, as our fused step takes them (`engine.kernels` DecoderLayer)."""
    norms = {
        name: kernels.LayerNorm(*getattr(w, name)) for name in ("ln_self", "ln_cross", "ln_ffn")
    }
    projections = {name: kernel_projection(kernels, getattr(w, name)) for name in PROJECTIONS}
    return kernels.DecoderLayer(**norms, **projections)


def _joined_heads(lm_heads: Sequence[torch.nn.Linear]) -> torch.Tensor:
    """The codebooks' lm heads as one projection's weight [K * V, E] (one product a step)."""
    return torch.cat([h.weight for h in lm_heads])


def _ln(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight, module.bias


class Decoder:
    def __init__(
        self,
        causal_lm: MusicgenDecoder | MusicgenForCausalLM,
        precision: str = "dense",
        kv_cache: str = "auto",
        int4_group: int = INT4_GROUP,
        *,
        settings: Resolved | None = None,
        modules: KernelModules | None = None,
    ) -> None:
        """`causal_lm`: a MusicGen decoder's modules (`engine.musicgen.MusicgenDecoder`, or
        transformers' `MusicgenForCausalLM`: model.decoder of the full model);
        `settings`: a loaded model's resolved settings (`engine.settings.resolve`: how the
        projections run, the KV cache, our CPU kernels). Without them the decoder resolves its
        own with the same function, from its weights' device and dtype and:
        `precision`: how the projections run (`engine.linear`: "dense", "int8", "int4", or
        "int4-ffn": int4 fc1/fc2 and int8 for the rest);
        `kv_cache`: its kind, "auto", "float32", "bfloat16", "int8" or "int4".
        `int4_group`: inputs per scale of the int4 projections (`engine.linear.INT4_GROUPS`).
        `modules`: our C++ modules to run on, in place of those `settings` chose
        (`KernelModules.of`): another build of the same kernels (`bench/kernel_ab.py`)."""
        if precision not in DECODER_PRECISIONS:
            raise ValueError(f"precision must be one of {DECODER_PRECISIONS}, got {precision!r}")
        dec = causal_lm.model.decoder
        config = causal_lm.config
        self.num_codebooks = config.num_codebooks
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.max_positions = config.max_position_embeddings
        self.activation = dec.layers[0].activation_fn
        self._kernel_gelu = _exact_gelu(self.activation)  # (`_fc1_activated`)
        self.embed = [e.weight for e in dec.embed_tokens]  # K x [V + 1, E]
        self.positions = dec.embed_positions.weights  # [max_positions, E]
        self.final_ln = _ln(dec.layer_norm)
        heads = _joined_heads(causal_lm.lm_heads)  # [K * V, E]
        self.vocab = causal_lm.lm_heads[0].weight.shape[0]
        self.device = heads.device
        self.dtype = heads.dtype
        if settings is None:
            dtype = str(self.dtype).removeprefix("torch.")
            settings = for_decoder(str(self.device), dtype, precision, kv_cache, self.head_dim)
        elif (precision, kv_cache) != ("dense", "auto"):
            raise ValueError(
                "a decoder takes its precision and KV cache from `settings` or the "
                "arguments, not both"
            )
        self.settings = settings
        self.precision = precision = settings.precision
        self.int4_group = int4_group
        # PyTorch's CPU attention kernels are several times slower in bfloat16 than in float32
        # (measured: 2.5 vs 0.4 ms per layer at 1000 positions), so without our kernels the KV
        # cache and the attention stay float32 on a CPU; GPUs attend in the model dtype.
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.kv_cache = settings.kv_cache  # a KVCache kind: the one new caches take
        self.full_cache = self.kv_cache  # ... as set (`use_cheap_cache` swaps int8 for int4)
        modules = modules or KernelModules.of(settings)
        self._modules = modules
        # our CPU kernels: the int8 and bfloat16 projections, and (over a cache they read) the
        # attention and sampling of a decode step
        self._kernels = modules.kernels if settings.kernel_attention else None
        heads_precision = projection_precision(precision, "lm_heads")
        self.lm_heads = make_linear(heads, heads_precision, modules, int4_group)  # E -> K * V
        self.layers = [self._layer(layer, precision, modules, int4_group) for layer in dec.layers]
        # A prefill is a big matrix product (compute-bound). PyTorch's int8 dynamic kernels lose
        # there, so without our kernels an int8 decoder prefills with dense weights (bfloat16
        # where the CPU is fast at it: `Resolved.prefill`); our linear_int8 wins there too (500
        # frames of musicgen-small here: 1.2 s against 2.0 s in bfloat16), so with it the int8
        # layers serve. int4 projections prefill through their own kernel (any number of rows).
        self.prefill_layers = self.layers
        if settings.prefill != "decode":
            self.prefill_layers = [
                self._layer(layer, settings.prefill, modules, int4_group, like)
                for layer, like in zip(dec.layers, self.layers, strict=True)
            ]
        self.layer_norm_eps = dec.layer_norm.eps
        self._fused = self._fused_step()
        self.weight_pages = in_huge_pages(f"{precision} weights", self.layers, self.lm_heads)
        # coarse weights (`use_coarse`): int4 projections swapped in while generation cannot
        # keep up, in the last `coarse` share of the layers; built the first time they are
        # asked for, from these modules. Each set: (layers, prefill layers, lm heads, fused step)
        self.coarse = 0.0
        self.coarse_pages: HugePages | None = None  # the int4 set's, once built
        self._source = (dec.layers, causal_lm.lm_heads)  # modules: no weight copy kept
        self._fine: WeightSet = (self.layers, self.prefill_layers, self.lm_heads, self._fused)
        self._coarse: WeightSet | None = None  # every layer and the lm heads int4
        self._mixed: dict[int, WeightSet] = {}  # by the number of (last) layers int4
        # cross_kv rounds to bfloat16 for the fused step; fixed here, so that the op-by-op path
        # (tests switch `_fused` off to compare) reads the same values
        self._cross_bf16 = self._fused is not None
        # the fused step's cross-attention folded into the text where that reads fewer bytes
        # (`cross_kv`, `decode_one_step`); tests switch it off to compare with the op-by-op path
        self.fold_cross = True
        self.fold_stations = 1  # stations expected to share a step: see `cross_kv`
        self._cross_weights: tuple[list[LayerWeights], int] | None = None
        self._text: list[TextWeights] | None = None  # `_text_weights`, once built
        self._encoder_products: Bf16Products | None = None  # `encoder_products`, once built
        self.cross_seconds = 0.0  # spent in `cross_kv` so far, folds apart (`fold_seconds`)
        self.fold_seconds = 0.0  # spent in `fold` so far
        # per KV cache kind: (the layers it was counted on, bytes, bytes per position and row)
        self._read_per_step: dict[str, tuple[list[LayerWeights], float, float]] = {}

    def clock_parts(self, on: bool) -> None:
        """Time each part of the coming fused decode steps of the weights in use (their layer
        norms, products, attentions: `part_times`), or stop. ValueError where the fused step does
        not run."""
        if self._fused is None:
            raise ValueError("the parts of a step are timed on our fused CPU step, not run here")
        self._fused.clock_parts(on)

    def part_times(self) -> list[tuple[str, float, int, int]]:
        """(part, seconds, laps, cache bytes) of each part of the fused steps since `clock_parts`
        or the last call, in a step's order (each part from its start to the next's, as the
        calling thread sees it, the other threads' waits included; the bytes of the KV cache the
        part read: the self-attention's, 0 for the others)."""
        if self._fused is None:
            raise ValueError("the parts of a step are timed on our fused CPU step, not run here")
        return [(str(name), float(s), int(n), int(b)) for name, s, n, b in self._fused.part_times()]

    def projection_bytes(self) -> dict[str, int]:
        """The bytes each projection of the weights in use streams in a step, over all layers
        (`qkv`, `out_self`, `q_cross`, `out_cross`, `fc1`, `fc2`) and the `lm_heads`."""
        out = {
            name: sum(t.nbytes for w in self.layers for t in packed_tensors(getattr(w, name)))
            for name in PROJECTIONS
        }
        out["lm_heads"] = sum(t.nbytes for t in packed_tensors(self.lm_heads))
        return out

    def coarse_available(self) -> str | None:
        """None when `use_coarse` can run here, else why not: it needs int8 projections through
        our kernels with the fused step (a CPU), and the int4 kernel."""
        if self.precision != "int8" or self._fused is None:
            return "coarse weights replace int8 projections on our fused CPU step"
        from engine.kernels import int4

        return int4.unavailable_reason()

    @property
    def coarse_ready(self) -> bool:
        """Whether the int4 set is built (`use_coarse` then swaps at once)."""
        return self._coarse is not None

    def use_coarse(self, share: float) -> None:
        """int4 projections in place of the int8 ones in the last `share` of the layers (1: all
        of them and the lm heads; 0: none), or back: for musicgen-small on a 2-core AVX2 CPU
        all of them step x1.3-1.5 as fast at 16% of the logit spread against int8's 2.2%
        (docs/int4-weights.md), the last half ~x1.2 at 7.9% (the last layers' rounding moves
        the logits least: the first half int4 12.6%). Everything else stays, the KV cache
        included: the step after a swap reads the cache the steps before it wrote. The int4
        set is quantized here the first time unless `prepare_coarse` built it (seconds for
        musicgen-small); a share's fused step is made at its first use; call between steps,
        from the thread that steps."""
        share = float(share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"coarse: a share of the layers in [0, 1], got {share}")
        if share == self.coarse:
            return
        if share > 0:
            for _ in self.prepare_coarse():
                pass
        self.layers, self.prefill_layers, self.lm_heads, self._fused = self._weights(share)
        self.coarse = share

    def _weights(self, share: float) -> WeightSet:
        """The weight set with the last `share` of the layers int4 (`use_coarse`)."""
        if share == 0.0:
            return self._fine
        assert self._coarse is not None
        if share == 1.0:
            return self._coarse
        fine, coarse = self._fine[0], self._coarse[0]
        n = min(max(round(share * len(fine)), 1), len(fine))
        if n not in self._mixed:
            layers = fine[: len(fine) - n] + coarse[len(fine) - n :]
            fused = self._fused_step(layers, self._fine[2])
            self._mixed[n] = (layers, layers, self._fine[2], fused)
        return self._mixed[n]

    def prepare_coarse(self) -> Iterator[None]:
        """Build the int4 set for `use_coarse` a layer at a time: each step of the iterator
        quantizes one layer (the last one the lm heads and the fused step), so that a caller can
        spread the seconds between its decode steps; exhausted, the set is ready and
        `use_coarse` swaps at once. Nothing to do when it is ready; ValueError (before the first
        step) where coarse weights cannot run. Call from the thread that steps."""
        if self.coarse_ready:
            return
        reason = self.coarse_available()
        if reason is not None:
            raise ValueError(reason)
        from engine.kernels import int4

        modules = KernelModules(self._kernels, self._modules.int4 or int4.get())
        layers, heads = self._source
        coarse: list[LayerWeights] = []
        spent = 0.0  # moving them into huge pages, a layer at a time as well
        for layer in layers:
            if coarse:
                yield
            coarse.append(self._layer(layer, "int4", modules, self.int4_group))
            began = time.perf_counter()
            huge_pages(packed_weights(coarse[-2:]))  # this layer's, and where the last one ends
            spent += time.perf_counter() - began
        lm_heads = make_linear(_joined_heads(heads), "int4", modules, self.int4_group)
        fused = self._fused_step(coarse, lm_heads)
        assert fused is not None, "int4 projections run on the fused step where int8 ones do"
        if not self.coarse_ready:  # another iterator may have finished first
            self.coarse_pages = in_huge_pages("int4 weights (coarse)", coarse, lm_heads, spent)
            self._coarse = (coarse, coarse, lm_heads, fused)
        yield

    def cheap_cache_available(self) -> str | None:
        """None when `use_cheap_cache` can run here, else why not: it needs an int8 KV cache
        read by our fused CPU step, in heads of 64 (the int4 cache's)."""
        if self.full_cache != "int8" or self._fused is None:
            return "a cheaper KV cache replaces an int8 one on our fused CPU step"
        if self.head_dim != Q4_HEAD:
            return f"an int4 KV cache holds heads of {Q4_HEAD}, this model's are {self.head_dim}"
        return None

    @property
    def cheap_cache(self) -> bool:
        """Whether caches are int4 in place of the int8 ones set (`use_cheap_cache`)."""
        return self.kv_cache != self.full_cache

    def use_cheap_cache(self, on: bool) -> None:
        """An int4 KV cache in place of the int8 one (`on`), or back: half the bytes a step's
        attention reads (x1.08-1.09 the real-time factor of one musicgen-small station here,
        more for several), at 3.0% of the logit spread against 2.2% (docs/benchmarks.md,
        "Precision"). New caches take the kind at once; `MusicModel.use_cheap_cache` converts
        every batch it opened at once, any other `DecodeBatch` converts its own at its next
        step (`KVCache.converted`: every position written requantized, tens of milliseconds).
        ValueError where it cannot run (`cheap_cache_available`)."""
        reason = self.cheap_cache_available()
        if reason is not None:
            raise ValueError(reason)
        self.kv_cache = "int4" if on else self.full_cache

    def _fused_step(
        self, layers: list[LayerWeights] | None = None, lm_heads: Projection | None = None
    ) -> FusedStep | None:
        """Our one-call decode step (`engine/kernels/decode_step.h`) where it applies: int8 or
        int4 weights through our kernels (each projection either: int4-ffn mixes them), an int8
        or int4 KV cache and the exact GELU; else None."""
        layers = self.layers if layers is None else layers
        lm_heads = self.lm_heads if lm_heads is None else lm_heads
        k = self._kernels
        fused = (
            k is not None
            and self.kv_cache in ("int8", "int4")
            and isinstance(lm_heads, FUSED_PROJECTIONS)
            and all(
                isinstance(p, FUSED_PROJECTIONS)
                for w in layers
                for p in (getattr(w, name) for name in PROJECTIONS)
            )
            and _exact_gelu(self.activation)
        )
        if k is None or not fused:
            return None
        return k.DecodeStepInt8(
            embed=self.embed,
            positions=self.positions,
            layers=[kernel_layer(k, w) for w in layers],
            ln_final=k.LayerNorm(*self.final_ln),
            lm_heads=kernel_projection(k, lm_heads),
            heads=self.heads,
            eps=self.layer_norm_eps,
        )

    @staticmethod
    def _layer(
        layer: DecoderLayer | MusicgenDecoderLayer,
        precision: str,
        modules: KernelModules,
        int4_group: int,
        like: LayerWeights | None = None,
    ) -> LayerWeights:
        """One layer's weights in a decoder mode; with `like`, its int4 projections are taken
        from there (a prefill's layers share them rather than quantize them twice)."""

        def linear(name: str, *parts: torch.nn.Linear) -> Projection:
            if like is not None and isinstance(getattr(like, name), Int4KernelLinear):
                return getattr(like, name)
            weight = parts[0].weight if len(parts) == 1 else torch.cat([m.weight for m in parts])
            return make_linear(weight, projection_precision(precision, name), modules, int4_group)

        attn, cross = layer.self_attn, layer.encoder_attn
        return LayerWeights(
            ln_self=_ln(layer.self_attn_layer_norm),
            qkv=linear("qkv", attn.q_proj, attn.k_proj, attn.v_proj),
            out_self=linear("out_self", attn.out_proj),
            ln_cross=_ln(layer.encoder_attn_layer_norm),
            q_cross=linear("q_cross", cross.q_proj),
            k_cross=cross.k_proj.weight,
            v_cross=cross.v_proj.weight,
            out_cross=linear("out_cross", cross.out_proj),
            q_cross_weight=cross.q_proj.weight,
            out_cross_weight=cross.out_proj.weight,
            ln_ffn=_ln(layer.final_layer_norm),
            fc1=linear("fc1", layer.fc1),
            fc2=linear("fc2", layer.fc2),
        )

    @property
    def kernels(self) -> ModuleType | None:
        """Our CPU kernel module when this decoder runs on it (engine/kernels), else None."""
        return self._kernels

    def wait(self) -> None:
        """Wait for the work queued on the decoder's device: a GPU runs it after the call
        returns, so a clock read before this times the launches, not the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self, batch: int, max_positions: int) -> KVCache:
        return KVCache(
            len(self.layers),
            batch,
            self.heads,
            max_positions,
            self.head_dim,
            device=self.device,
            kind=self.kv_cache,
        )

    def cross_kv(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, fold: bool = True
    ) -> CrossKV:
        """text_states: [B, S, E] projected and masked; text_mask: [B, S] bool.

        For our fused step the keys and values are rounded to bfloat16 (half the bytes it reads
        per step; a few text tokens per station, a step reads them all: ~8 MB a station for a
        40-token prompt, as much as 150 positions of its int4 cache), and the op-by-op path
        reads the same rounded values. The rows whose text reads fewer bytes folded (below) are
        folded now, or with `fold` False left to `fold` (`CrossKV.fold_later`): the fold costs
        more than the projections (a 17-token prompt 61 ms against 29 on 2 Zen 3 cores), and a
        prompt change need not wait for it (`engine.batch.FOLD_AFTER_STEPS`)."""
        began = time.perf_counter()
        try:
            cross = self._cross_kv(text_states, text_mask)
        finally:
            self.cross_seconds += time.perf_counter() - began
        return self.fold(cross) if fold else cross

    def _cross_kv(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> CrossKV:
        b, s, _ = text_states.shape
        split = (b, s, self.heads, self.head_dim)
        # rows with text: guidance's null rows (all zeros) have zero keys and values, and
        # projecting them would be half of a prompt change's work here
        live = text_states.flatten(1).any(dim=1)
        every = bool(live.all())

        text = self._text_weights()  # bfloat16 copies where the products run in bfloat16
        kernel = self.text_kernel
        native = text is not None and kernel is None  # PyTorch's bfloat16 maths
        inputs = text_states.to(torch.bfloat16) if native else text_states

        def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w) if kernel is None else linear_bf16_weights(kernel, x, w)

        def heads(w: torch.Tensor) -> torch.Tensor:
            if every:
                out = linear(inputs, w)
            else:
                out = inputs.new_zeros(b, s, w.shape[0])
                out[live] = linear(inputs[live], w)
            return out.view(split).transpose(1, 2)

        def rounded(x: torch.Tensor) -> torch.Tensor:
            return self._attn(x.to(torch.bfloat16) if self._cross_bf16 else x)

        keys, values, projected = [], [], []
        for i, w in enumerate(self.layers):
            if text is None:
                k, v = heads(w.k_cross), heads(w.v_cross)
            else:
                k, v = heads(text[i].k), heads(text[i].v)
            keys.append(rounded(k))
            values.append(rounded(v))
            projected.append((k, v))
        cross = CrossKV(keys, values, text_mask[:, None, None, :])
        if self._fused is None or not self.fold_cross:
            return cross
        # a row folds when its text alone reads less than FOLD_SHARE of the projections' weights
        # over the stations expected (`fold_stations`): the choice is the row's own, so a station
        # makes the same music batched or alone
        lengths = cross.stacked()[3]
        share = FOLD_SHARE * self.cross_weight_bytes() / max(self.fold_stations, 1)
        limit = share / self._fold_token_bytes()
        rows = ((lengths > 0) & (lengths < limit)).nonzero()[:, 0]
        if len(rows):
            cross.fold_later = FoldLater(rows, projected)
        return cross

    def fold(self, cross: CrossKV) -> CrossKV:
        """`cross` with the attention folded into the text of the rows `cross_kv` chose
        (`fold_later`); `cross` itself when none waits. The keys, values and mask are shared."""
        later = cross.fold_later
        if later is None:
            return cross
        began = time.perf_counter()
        b, _, s, _ = later.projected[0][0].shape
        text = self._text_weights()
        folded = Folded.unset(len(self.layers), b, self.heads, s, self.hidden)
        for i, (w, (k, v)) in enumerate(zip(self.layers, later.projected, strict=True)):
            t = None if text is None else text[i]
            folded.put(i, later.rows, self._fold(w, k[later.rows], v[later.rows], t), self._kernels)
        self.fold_seconds += time.perf_counter() - began
        return CrossKV(cross.keys, cross.values, cross.mask, [(0, folded)], _stacked=cross._stacked)

    @property
    def text_bfloat16(self) -> bool:
        """Whether a prompt's text goes through bfloat16 products (`Resolved.text_products`):
        its encoder (`MusicModel.encode_prompt`) and its cross-attention inputs (`cross_kv`),
        those of our fused step (fixed at load, as `_cross_bf16`: when tests switch the step
        off, the op-by-op path reads the same inputs)."""
        return self._cross_bf16 and self.settings.text_products in TEXT_BFLOAT16

    @property
    def encoder_products(self) -> Bf16Products | None:
        """Where our kernel runs the text (`text_kernel`), the T5 encoder's products through it
        (`encode_prompt(..., products=)`; its bfloat16 weights made at the first prompt)."""
        kernel = self.text_kernel
        if kernel is None:
            return None
        if self._encoder_products is None:
            self._encoder_products = Bf16Products(kernel)
        return self._encoder_products

    @property
    def text_kernel(self) -> ModuleType | None:
        """Our kernels where a prompt's text products run through them (`linear_bf16_weights`:
        text products "bfloat16-weights"), else None."""
        if self.text_bfloat16 and self.settings.text_products == "bfloat16-weights":
            return self._modules.kernels
        return None

    def _text_weights(self) -> list[TextWeights] | None:
        """Per layer, bfloat16 copies of the weights a prompt's text goes through in
        `cross_kv` (built at the first prompt: 8 MB a layer for musicgen-small), where the
        settings run those products in bfloat16 on our fused step; None: float32, the modules'
        own weights (the products are those of our fused step, whether or not it runs now)."""
        if not self.text_bfloat16:
            return None
        if self._text is None:
            e, h, d = self.hidden, self.heads, self.head_dim

            # [H, D, E] bfloat16; for our kernel in panels of 8 features [H, E / 8, D, 8]
            layout = panels if self.text_kernel is not None else torch.Tensor.contiguous

            def per_head(weight: torch.Tensor) -> torch.Tensor:
                return layout(weight.to(torch.bfloat16))

            self._text = [
                TextWeights(
                    k=w.k_cross.to(torch.bfloat16),
                    v=w.v_cross.to(torch.bfloat16),
                    q=per_head(w.q_cross_weight.view(h, d, e)),
                    out=per_head(w.out_cross_weight.view(e, h, d).permute(1, 2, 0)),
                )
                for w in self.layers
            ]
        return self._text

    def _fold_token_bytes(self) -> int:
        """Bytes a step reads per folded text position: z and u per layer and head, int8 with a
        float32 scale each."""
        return len(self.layers) * self.heads * 2 * (self.hidden + 4)

    def cross_read(self, cross: CrossKV) -> tuple[int, bool]:
        """(bytes, folded): what our fused step reads per step for the cross-attention over
        `cross` besides its keys and values: the folded rows' text (`cross_kv`), and q_cross's
        and out_cross's weights where another row reads text through them; folded: whether
        any row is."""
        tokens, projected = cross.folded_read()
        weights = self.cross_weight_bytes() if projected else 0
        return tokens * self._fold_token_bytes() + weights, tokens > 0

    def read_per_step(self) -> tuple[float, float]:
        """(bytes, bytes per position per row) a decode step reads: the projections' weights and
        the lm heads (all of q_cross's and out_cross's: a folded prompt reads less), and one
        row's KV cache per position (the kind new caches take now)."""
        counted = self._read_per_step.get(self.kv_cache)
        if counted is None or counted[0] is not self.layers:  # (as `cross_weight_bytes`)
            weights = projection_bytes(self.lm_heads)
            weights += sum(
                projection_bytes(getattr(w, n)) for w in self.layers for n in PROJECTIONS
            )
            cache = self.new_cache(1, 16)
            per_position = sum(t.nbytes for t in cache.tensors()) / 16
            counted = (self.layers, float(weights), per_position)
            self._read_per_step[self.kv_cache] = counted
        return counted[1], counted[2]

    def cross_weight_bytes(self) -> int:
        """Bytes of q_cross's and out_cross's weights a step reads (int8 or int4 as set now)."""
        if self._cross_weights is None or self._cross_weights[0] is not self.layers:
            total = sum(
                projection_bytes(w.q_cross) + projection_bytes(w.out_cross) for w in self.layers
            )
            self._cross_weights = (self.layers, total)
        return self._cross_weights[1]

    def _fold(
        self, w: LayerWeights, k: torch.Tensor, v: torch.Tensor, text: TextWeights | None = None
    ) -> torch.Tensor:
        """One layer's cross-attention folded into the text, [B, H, 2, S, E] float32: per head
        h and text position, z = W_q,h^T k / sqrt(D) (a query's score is then its normed input
        times z) and u = W_o[:, h] v (the output is the scores' softmax times u, summed over
        heads and positions). k, v [B, H, S, D] as projected. With `text`, the layer's bfloat16
        weights: through our kernel where it runs the text (`text_kernel`: float32 maths), else
        in bfloat16 (k and v bfloat16 too); without, float32 products of the modules' weights."""
        e, h, d = self.hidden, self.heads, self.head_dim
        kernel = self.text_kernel
        if text is not None and kernel is not None:  # float32 maths, per head over every row

            def per_head(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
                b, _, s, _ = x.shape
                rows = x.float().transpose(0, 1).reshape(h, b * s, d)
                return kernel.matmul_panels(rows, weights, e).view(h, b, s, e).transpose(0, 1)

            return torch.stack([per_head(k, text.q) * d**-0.5, per_head(v, text.out)], dim=2)
        if text is not None:
            z = torch.einsum("bhsd,hde->bhse", k, text.q).float() * d**-0.5
            u = torch.einsum("bhsd,hde->bhse", v, text.out).float()
            return torch.stack([z, u], dim=2)
        q_w = w.q_cross_weight.float().view(h, d, e)
        out_w = w.out_cross_weight.float().view(e, h, d)
        z = torch.einsum("bhsd,hde->bhse", k.float(), q_w) * d**-0.5
        u = torch.einsum("bhsd,ehd->bhse", v.float(), out_w)
        return torch.stack([z, u], dim=2)

    def _embed(
        self, ids: torch.Tensor, start: int, rows_at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids: [B, K, T] -> [B, T, E] token embeddings summed over codebooks, plus positions
        (from `start`, or `rows_at` [B]: one position per row when T == 1)."""
        x = sum(F.embedding(ids[:, k], self.embed[k]) for k in range(self.num_codebooks))
        if rows_at is not None:
            return x + self.positions[rows_at][:, None]
        return x + self.positions[start : start + ids.shape[-1]]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.attn_dtype)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, E] -> [B, H, T, D] in the attention dtype."""
        b, t, _ = x.shape
        return self._attn(x.view(b, t, self.heads, self.head_dim).transpose(1, 2))

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, E] in the model dtype."""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.hidden).to(self.dtype)

    def forward(
        self,
        ids: torch.Tensor,
        start: int,
        cache: KVCache,
        cross: CrossKV,
        rows_at: list[int] | None = None,
    ) -> torch.Tensor:
        """Run positions [start, start + T) and return hidden states [B, T, E] after the final norm:
        a prefill (from position 0), or one step attended by our CPU kernels (T == 1 when they
        run; a step without them is `step_logits`).

        ids: [B, K, T]. `rows_at` (T == 1 only): each row's own position, for streams batched at
        different points of their windows; `start` is then ignored.
        """
        t = ids.shape[-1]
        step = t == 1 and self._kernels is not None
        assert step or (start == 0 and rows_at is None), (
            "a prefill starts at 0 for all rows; a step without our kernels is `step_logits`"
        )
        if rows_at is not None and len(set(rows_at)) == 1:
            start, rows_at = rows_at[0], None
        if rows_at is None:
            x = self._embed(ids, start)
            end = start + t
            at = torch.full((ids.shape[0],), start)
        else:
            at = torch.tensor(rows_at)  # [B]
            x = self._embed(ids, 0, at)
            end = max(rows_at) + 1

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            return self._self_attention(layer, qkv, cache, at)

        layers = self.layers if t == 1 else self.prefill_layers
        text = self._text_rows(cross) if t > 1 else None
        hidden = self._layers(x, layers, attend, cross.keys, cross.values, cross.mask, text)
        cache.length = end
        return hidden

    def _layers(
        self,
        x: torch.Tensor,
        layers: list[LayerWeights],
        self_attention: Callable[[int, torch.Tensor], torch.Tensor],
        cross_keys: Sequence[torch.Tensor],
        cross_values: Sequence[torch.Tensor],
        cross_mask: torch.Tensor,
        text_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder layers and the final norm: x [B, T, E] -> hidden states [B, T, E].
        `self_attention(layer, qkv)`: qkv [B, T, 3E] (the fused projection) -> [B, T, E] in the
        model dtype, its keys and values written into the cache; cross_keys, cross_values: per
        layer [B, H, S, D]; cross_mask: [B, 1, 1, S] bool, True = attend. `text_rows`: the rows
        whose cross-attention adds anything (`_text_rows`; None: all)."""
        text_mask = cross_mask if text_rows is None else cross_mask[text_rows]
        for i, w in enumerate(layers):
            h = F.layer_norm(x, (self.hidden,), *w.ln_self)
            x = x + w.out_self(self_attention(i, w.qkv(h)))

            if text_rows is None:
                x = x + self._cross_attention(w, x, cross_keys[i], cross_values[i], cross_mask)
            elif len(text_rows):
                keys, values = cross_keys[i][text_rows], cross_values[i][text_rows]
                a = self._cross_attention(w, x[text_rows], keys, values, text_mask)
                x = x.index_add(0, text_rows, a)

            h = F.layer_norm(x, (self.hidden,), *w.ln_ffn)
            x = x + w.fc2(self._fc1_activated(w.fc1, h))
        return F.layer_norm(x, (self.hidden,), *self.final_ln)

    def _cross_attention(
        self,
        w: LayerWeights,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One layer's cross-attention output for rows x [B, T, E] over their text's keys and
        values [B, H, S, D] (mask [B, 1, 1, S])."""
        h = F.layer_norm(x, (self.hidden,), *w.ln_cross)
        q = self._split_heads(w.q_cross(h))
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return w.out_cross(self._merge_heads(a))

    def _text_rows(self, cross: CrossKV) -> torch.Tensor | None:
        """A prefill's rows whose cross-attention adds anything, where some add nothing and our
        kernels run: guidance's null rows (all-zero values, no bias: exactly zero) skip
        q_cross, the attention and out_cross (7% of a prompt change's prefill products); a
        row's products on our kernels do not depend on the rows beside it. None: all rows.
        (`CrossKV.stacked`, built for the fused step anyway, says which rows read no text.)"""
        if self._kernels is None or not self._cross_bf16:
            return None
        live = cross.stacked()[3] > 0
        return None if bool(live.all()) else live.nonzero()[:, 0]

    def _fc1_activated(self, fc1: Projection, h: torch.Tensor) -> torch.Tensor:
        """gelu(fc1(h)): in one call where fc1 is our int8 kernel's and the model's activation
        the exact gelu (the kernel adds it to its products, as the fused step does)."""
        if isinstance(fc1, Int8KernelLinear) and self._kernel_gelu:
            return fc1.with_gelu(h)
        return self.activation(fc1(h))

    def _self_attention(
        self, layer: int, qkv: torch.Tensor, cache: KVCache, at: torch.Tensor
    ) -> torch.Tensor:
        """qkv [B, T, 3E], the fused projection of a prefill's positions [0, T), or of one step at
        each row's position `at` [B] on our kernels (T == 1 there is always theirs) -> attention
        output [B, T, E] in the model dtype. The positions' keys and values go into the cache
        first."""
        b, t, _ = qkv.shape
        if t == 1 and self._kernels is not None:  # write, attend and merge heads in one call
            attend = {
                "int8": self._kernels.attend_step_q8,
                "int4": self._kernels.attend_step_q4,
            }.get(cache.kind, self._kernels.attend_step)
            a = attend(qkv.view(b, -1), *cache.layer(layer), at, self.head_dim**-0.5)
            return a.view(b, 1, self.hidden).to(self.dtype)
        q, k, v = (self._split_heads(x) for x in qkv.chunk(3, dim=-1))
        cache.write(layer, 0, k, v)
        # a prefill from position 0 attends to exactly the keys it just wrote
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step_logits(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cross_keys: Sequence[torch.Tensor],
        cross_values: Sequence[torch.Tensor],
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step whose shapes never change (the eager step without our kernels, and the
        function `engine.static_step` compiles): each row at its own position, attending to
        every slot of the cache it is given under the mask `arange(P) <= positions[row]` (the
        compiled step: the whole preallocated cache; the eager one: the slots some row can see).

        ids: [B, K]; positions: [B] long; keys, values: [L, B, H, P, D], a float KV cache
        (`KVCache.tensors()`, or its first P slots), written in place at `positions` (by tensor
        index: no Python number comes from a tensor); cross_keys, cross_values: per layer
        [B, H, S, D] (`CrossKV`'s lists, or tensors [L, B, H, S, D]: the static step's padded
        text buffers); cross_mask: [B, 1, 1, S] bool. Returns float32 logits [B, K, V]."""
        x = self._embed(ids[:, :, None], 0, positions)  # [B, 1, E]
        rows = torch.arange(ids.shape[0], device=ids.device)
        slots = torch.arange(keys.shape[3], device=ids.device)
        mask = (slots <= positions[:, None])[:, None, None, :]  # [B, 1, 1, P]

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            q, k, v = (self._split_heads(t) for t in qkv.chunk(3, dim=-1))  # [B, H, 1, D]
            layer_keys, layer_values = keys[layer], values[layer]  # [B, H, P, D]
            layer_keys[rows, :, positions] = k[:, :, 0].to(keys.dtype)
            layer_values[rows, :, positions] = v[:, :, 0].to(values.dtype)
            # a bfloat16 cache (our CPU kernels' layout, under a compiled step) attends as q's dtype
            a = F.scaled_dot_product_attention(
                q, layer_keys.to(q.dtype), layer_values.to(q.dtype), attn_mask=mask
            )
            return self._merge_heads(a)

        hidden = self._layers(x, self.layers, attend, cross_keys, cross_values, cross_mask)
        return self.logits(hidden[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, E] -> float32 logits [B, K, V]."""
        return self.lm_heads(hidden).view(hidden.shape[0], self.num_codebooks, self.vocab).float()

    def prefill(self, ids: torch.Tensor, cache: KVCache, cross: CrossKV) -> torch.Tensor:
        """ids: [B, K, T] from position 0. Returns logits [B, K, V] predicting position T."""
        cache.reset()
        hidden = self.forward(ids, 0, cache, cross)
        return self.logits(hidden[:, -1])

    def decode_one_step(
        self, ids: torch.Tensor, cache: KVCache, cross: CrossKV, rows_at: list[int] | None = None
    ) -> torch.Tensor:
        """ids: [B, K] at position cache.length (or each row at `rows_at`). Returns logits
        [B, K, V] for the next position: on our fused step, our attention kernels, or
        `step_logits`."""
        at = rows_at if rows_at is not None else [cache.length] * ids.shape[0]
        if self._fused is not None and cache.quantized:
            step = self._fused.step_q4 if cache.kind == "int4" else self._fused.step
            folded = cross.folded_inputs()
            logits = step(
                ids,
                torch.tensor(at),
                *cache.tensors(),
                *cross.stacked(),
                folded.vectors,
                folded.scales,
                folded.rows,
            )
            cache.length = max(at) + 1
            return logits.view(ids.shape[0], self.num_codebooks, self.vocab)
        if self._kernels is not None:
            hidden = self.forward(ids[:, :, None], cache.length, cache, cross, rows_at)
            return self.logits(hidden[:, -1])
        assert not cache.quantized, f"a {cache.kind} KV cache is read by our kernels only"
        assert max(at) < cache.max_positions, (
            f"KV cache overflow: {max(at)} >= {cache.max_positions}"
        )
        # Eagerly, the step attends to the slots some row can see, [0, max(at) + 1): the same
        # maths as over all P with less to read early in a window, and the float sums the eager
        # engine had (warm restarts write token for token what a prefill writes; over all P, a
        # seeded draw parts from it after ~450 frames of the tiny model).
        end = max(at) + 1
        keys, values = (t[:, :, :, :end] for t in cache.tensors())
        positions = torch.tensor(at, device=self.device)
        logits = self.step_logits(
            ids, positions, keys, values, cross.keys, cross.values, cross.mask
        )
        cache.length = end
        return logits
