"""What a decode batch hands to sampling, and the blend formula to compare it with.

The batch gives the sampler, per stream, its weighted conditional row `sum_i w_i * c_i` and its
null row `u` (engine/rows.py `mix_rows`); guidance then makes `u + g * (sum_i w_i * c_i - u)`.
"""

from __future__ import annotations

import torch

from engine import batch as batch_module


def capture_sampler(monkeypatch) -> list[torch.Tensor]:
    """Every logits tensor the batch hands to sampling ([streams * 2, K, V]: each stream's
    weighted conditional row and its null row), in order: a prefill's, then each step's."""
    seen: list[torch.Tensor] = []
    original = batch_module.sample_streams

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(batch_module, "sample_streams", spy)
    return seen


def assert_formula(
    seen: torch.Tensor, ref: torch.Tensor, weights: list[float], where: str, scale: float = 3.0
) -> None:
    """The sampler's input [2, K, V] of one stream equals (sum_i w_i * ref_i, ref_null) of
    reference rows ref [R, K, V] (one per text, the null row last), and so its guided logits
    equal the formula's, at guidance `scale`."""
    want = sum(w * ref[i] for i, w in enumerate(weights))
    torch.testing.assert_close(seen[0], want, atol=5e-5, rtol=1e-4, msg=where)
    torch.testing.assert_close(seen[1], ref[-1], atol=5e-5, rtol=1e-4, msg=where)
    guided = seen[1] + scale * (seen[0] - seen[1])
    formula = ref[-1] + scale * (want - ref[-1])
    torch.testing.assert_close(guided, formula, atol=2e-4, rtol=1e-4, msg=where)
