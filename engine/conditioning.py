"""Text conditioning: prompt text -> T5 states -> the decoder's cross-attention inputs.

Matches `MusicgenForConditionalGeneration` (`engine.musicgen` holds the same modules): the T5 output is projected by `enc_to_dec_proj`
(when the widths differ) and multiplied by the attention mask. The null row of classifier-free
guidance is all zeros, so its cross-attention keys and values are zero and it adds nothing; an
empty prompt is the null condition itself (unconditional generation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.t5 import Linear as TextLinear

if TYPE_CHECKING:
    from engine.musicgen import MusicGen


@dataclass
class TextCondition:
    states: torch.Tensor  # [S, E_dec] projected, masked text states (S >= 1)
    mask: torch.Tensor  # [S] bool, True where a text token is


def linear_bf16_weights(kernels: ModuleType, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (any leading shape) times bfloat16 weights w [N, K] -> float32 [..., N]
    through our kernel (float32 maths)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    return kernels.linear_bf16_weights(rows, w).view(*x.shape[:-1], w.shape[0])


class Bf16Products:
    """A prompt's text products (the T5 encoder's and `enc_to_dec_proj`'s) with bfloat16 copies
    of their weights through our kernel (`linear_bf16_weights`: float32 maths, any number of
    rows), where the CPU has no native bfloat16 maths (`Resolved.text_products`
    "bfloat16-weights"): half the bytes float32's products read, at x2-3 their speed for a
    prompt's ten-odd tokens (musicgen-small's T5 on 2 Zen 3 cores). The copies are made at the
    first prompt (170 MB for musicgen-small's T5)."""

    def __init__(self, kernels: ModuleType) -> None:
        self._kernels = kernels
        self._copies: dict[nn.Linear, torch.Tensor] = {}

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = self._copies.get(layer)
        if w is None:
            w = self._copies[layer] = layer.weight.detach().to(torch.bfloat16).contiguous()
        y = linear_bf16_weights(self._kernels, x, w)
        return y if layer.bias is None else y + layer.bias

    @contextmanager
    def routing(self, *modules: nn.Module | None) -> Iterator[None]:
        """Meanwhile, the text linears (`engine.t5.Linear`) in `modules` multiply here."""
        linears = [m for module in modules if module is not None for m in module.modules()]
        linears = [m for m in linears if isinstance(m, TextLinear)]
        for m in linears:
            m.route = self.linear
        try:
            yield
        finally:
            for m in linears:
                m.route = None


def encode_prompt(
    model: MusicGen, text: str, bfloat16: bool = False, products: Bf16Products | None = None
) -> TextCondition:
    """Encode one prompt with the model's T5 encoder. "" gives the null condition. `bfloat16`:
    its products in bfloat16 (autocast; x2.2 for musicgen-small's T5 on a CPU with native
    bfloat16 maths, the states 0.6% off float32's); `products`: instead, through bfloat16
    weights and our kernel (`Bf16Products`). The states are returned in the decoder's dtype."""
    device, dtype = model.decoder.device, model.decoder.dtype
    hidden = model.decoder.config.hidden_size
    if not text:
        return TextCondition(
            torch.zeros(1, hidden, device=device, dtype=dtype),
            torch.zeros(1, dtype=torch.bool, device=device),
        )
    assert model.tokenizer is not None, "a MusicGen loaded from a checkpoint has its tokenizer"
    ids = torch.tensor([model.tokenizer.ids(text)], device=device)
    mask = torch.ones_like(ids)
    route = (
        nullcontext()
        if products is None
        else products.routing(model.text_encoder, model.enc_to_dec_proj)
    )
    with (
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16 and products is None),
        route,
    ):
        states = model.text_encoder(ids, mask)
        if model.enc_to_dec_proj is not None:  # the text's width differs from the decoder's
            states = model.enc_to_dec_proj(states)
    states = states.to(dtype) * mask[..., None]
    return TextCondition(states[0], mask[0].bool())


def stack_rows(
    states: list[torch.Tensor], masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad groups of rows, states [R_i, S_i, E] and masks [R_i, S_i] bool, to the longest
    S and concatenate them: [sum R_i, S, E] and [sum R_i, S] (padding is masked out)."""
    longest = max(x.shape[1] for x in states)
    return (
        torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[1])) for x in states]),
        torch.cat([F.pad(m, (0, longest - m.shape[1]), value=False) for m in masks]),
    )


def condition_rows(
    conditions: Sequence[TextCondition], null: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream's decoder rows: one per condition (a blend's texts), then its null row when
    `null` (guidance). Returns states [R, S, E] (zero-padded to the longest text) and mask [R, S]
    bool. One condition gives what `batch_conditions([c], guidance=null)` gives."""
    states = [c.states for c in conditions]
    masks = [c.mask if bool(c.mask.any()) else torch.ones_like(c.mask) for c in conditions]
    if null:
        longest = max(x.shape[0] for x in states)
        states.append(states[0].new_zeros(longest, states[0].shape[1]))
        masks.append(masks[0].new_ones(longest))
    return stack_rows([x[None] for x in states], [m[None] for m in masks])


def batch_conditions(
    conditions: list[TextCondition], guidance: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack conditions into decoder rows: [cond_1..cond_N, null_1..null_N] when guidance is on.

    Returns states [B, S, E] (zero-padded to the longest prompt) and mask [B, S] bool. Null rows
    attend to all-zero states with a full mask, which yields exactly zero cross-attention output,
    as the reference's fully masked zero rows do.
    """
    states = [c.states for c in conditions]
    # A prompt with no token (the null condition) attends to zeros everywhere: output 0.
    masks = [c.mask if bool(c.mask.any()) else torch.ones_like(c.mask) for c in conditions]
    if guidance:
        states += [torch.zeros_like(c.states) for c in conditions]
        masks += [torch.ones_like(c.mask) for c in conditions]
    return stack_rows([x[None] for x in states], [m[None] for m in masks])
