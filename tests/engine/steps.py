"""Decode steps on the fused one-call step or on the op-by-op path, for comparing the two."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.conditioning import batch_conditions
from engine.decoder import kernel_projection


@contextlib.contextmanager
def projected(decoder) -> Iterator[None]:
    """Within: cross-attention inputs made by `decoder.cross_kv` are not folded into the text,
    so that the fused step runs q_cross and out_cross as the op-by-op path does (the folded
    maths skips their int8 rounding: tests/engine/test_folded_cross.py compares it)."""
    saved = decoder.fold_cross
    decoder.fold_cross = False
    try:
        yield
    finally:
        decoder.fold_cross = saved


def _start(decoder, model, rows_at: list[list[int]], prompts: list[str], fold: bool = False):
    """The seeded start of a comparison: the prompts' cross-attention inputs (projected, or with
    `fold` folded where `Decoder.cross_kv` folds), the row count and the cache (a row view of a
    bigger one, as stations get)."""
    torch.manual_seed(1)
    conditions = [model.encode_prompt(p) for p in prompts]
    with contextlib.nullcontext() if fold else projected(decoder):
        cross = decoder.cross_kv(*batch_conditions(conditions, guidance=True))
    rows = len(rows_at[0])
    return cross, rows, decoder.new_cache(rows + 2, 64).rows(1, rows)


def fused_step_of(k, decoder, layers):
    """Our fused step (`k.DecodeStepInt8`) over `decoder`'s embeddings, final norm and heads with
    the kernel layers `layers` given (tests alter them to see what it refuses)."""
    return k.DecodeStepInt8(
        embed=decoder.embed,
        positions=decoder.positions,
        layers=layers,
        ln_final=k.LayerNorm(*decoder.final_ln),
        lm_heads=kernel_projection(k, decoder.lm_heads),
        heads=decoder.heads,
        eps=decoder.layer_norm_eps,
    )


def decode_steps(decoder, model, fused: bool, rows_at: list[list[int]], prompts: list[str]):
    """Logits [steps, rows, K, V] of decode steps over random tokens (the same for both paths),
    each row at its own positions `rows_at[step]`, on the fused step or on the op-by-op path with
    the same weights and cache kind; the cache is a row view of a bigger one, as stations get."""
    saved = decoder._fused
    decoder._fused = saved if fused else None
    try:
        cross, rows, cache = _start(decoder, model, rows_at, prompts)
        out = []
        for at in rows_at:
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            out.append(decoder.decode_one_step(ids, cache, cross, at))
        return torch.stack(out)
    finally:
        decoder._fused = saved


def decode_steps_paired(decoder, model, rows_at: list[list[int]], prompts: list[str]):
    """Logits [steps, rows, K, V] of the fused step and of the op-by-op path from the same cache
    at every step (as `decode_steps`; the cache is saved before each step and put back for the
    op-by-op path, whose writes go on): a rounding boundary that one path's float sums cross in
    a cached key moves the one step where it happens, not every later step of its row."""
    saved = decoder._fused
    assert saved is not None, "the decoder does not take the fused step"
    try:
        cross, rows, cache = _start(decoder, model, rows_at, prompts)
        fused, op_by_op = [], []
        for at in rows_at:
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            before = [t.clone() for t in cache.tensors()]
            decoder._fused = saved
            fused.append(decoder.decode_one_step(ids, cache, cross, at))
            for t, b in zip(cache.tensors(), before, strict=True):
                t.copy_(b)
            decoder._fused = None
            op_by_op.append(decoder.decode_one_step(ids, cache, cross, at))
        return torch.stack(fused), torch.stack(op_by_op)
    finally:
        decoder._fused = saved


def assert_steps_agree(got: torch.Tensor, want: torch.Tensor, share: float) -> None:
    """Logits [steps, rows, K, V] of the two paths agree to float precision in at least `share`
    of the (step, row) pairs, and everywhere to 5% of the logits' spread. The two paths' float
    sums (layer norms, GELU, cross-attention) differ by ~1e-7; where that moves a value across a
    rounding boundary (an activation's int8, a key's nibble), one row's logits move by ~1e-3,
    and with a quantized cache that row's later steps with it. A wrong kernel moves them all."""
    err = (got - want).abs().amax(dim=(2, 3))
    assert (err < 1e-5).float().mean() >= share, err
    assert err.max() < 0.05 * want.std(), (err.max(), want.std())


def first_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where two token tensors first differ, for an assertion's message."""
    if got.shape != want.shape:
        return f"{list(got.shape)} != {list(want.shape)}"
    return f"first mismatch at {(got != want).nonzero()[0].tolist()}"


def assert_static_equals_eager(model, play, frames: int) -> None:
    """`play()` opens streams, changes them and returns them; run on the eager engine and on the
    static step (eagerly, `compile = "eager"`), every stream's first `frames` frames are equal."""
    results = []
    for compile in ("none", "eager"):
        model.compile = compile
        try:
            streams = play()
            for s in streams:
                s.tokens.generate_until(frames)
        finally:
            model.compile = "none"
        results.append([s.tokens.history()[0][:, :frames] for s in streams])
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want), first_mismatch(got, want)
