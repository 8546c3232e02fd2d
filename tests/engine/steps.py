"""Decode steps on the fused one-call step or on the op-by-op path, for comparing the two."""

from __future__ import annotations

import torch

from engine.conditioning import batch_conditions


def decode_steps(decoder, model, fused: bool, rows_at: list[list[int]], prompts: list[str]):
    """Logits [steps, rows, K, V] of decode steps over random tokens (the same for both paths),
    each row at its own positions `rows_at[step]`, on the fused step or on the op-by-op path with
    the same weights and cache kind; the cache is a row view of a bigger one, as stations get."""
    saved = decoder._fused
    decoder._fused = saved if fused else None
    try:
        torch.manual_seed(1)
        conditions = [model.encode_prompt(p) for p in prompts]
        cross = decoder.cross_kv(*batch_conditions(conditions, guidance=True))
        rows = len(rows_at[0])
        cache = decoder.new_cache(rows + 2, 64).rows(1, rows)
        out = []
        for at in rows_at:
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            out.append(decoder.decode_one_step(ids, cache, cross, at))
        return torch.stack(out)
    finally:
        decoder._fused = saved
