"""Sampling: the same probabilities as `transformers`' warpers, and the top-k fast path draws from
exactly that distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.options import SamplingOptions
from engine.sampling import logits_to_probs, sample, top_k_probs

OPTIONS = [
    SamplingOptions(),  # top-k 250, the default
    SamplingOptions(temperature=0.7, top_k=50, top_p=0.9),
    SamplingOptions(top_k=3, top_p=0.5),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_probabilities_equal_transformers_warpers(options):
    logits = torch.randn(8, 2048, generator=torch.Generator().manual_seed(0)) * 3
    warped = TemperatureLogitsWarper(options.temperature)(None, logits)
    warped = TopKLogitsWarper(options.top_k)(None, warped)
    if options.top_p:
        warped = TopPLogitsWarper(options.top_p)(None, warped)
    torch.testing.assert_close(logits_to_probs(logits, options), warped.softmax(-1))


@pytest.mark.parametrize("options", OPTIONS)
def test_top_k_path_is_the_whole_vocabulary_distribution(options):
    logits = torch.randn(2, 4, 2048, generator=torch.Generator().manual_seed(1)) * 3
    probs, index = top_k_probs(logits, options)
    assert probs.shape == index.shape == (2, 4, options.top_k)
    full = torch.zeros_like(logits).scatter(-1, index, probs)
    torch.testing.assert_close(full, logits_to_probs(logits, options))


def test_draws_follow_the_distribution():
    options = SamplingOptions(top_k=4, temperature=1.5)
    logits = torch.tensor([[[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]]).expand(20000, 1, 6)
    tokens = sample(logits, options, torch.Generator().manual_seed(2))  # [20000, 1]
    counts = torch.bincount(tokens.flatten(), minlength=6).float() / tokens.numel()
    want = logits_to_probs(logits[0, 0], options)
    assert counts[4:].sum() == 0  # never outside the top 4
    assert (counts - want).abs().max() < 0.015, (counts, want)
    whole = SamplingOptions(top_k=0, top_p=0.8)  # the whole vocabulary, top-p masks the tail
    tokens = sample(logits, whole, torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens.flatten(), minlength=6).float() / tokens.numel()
    want = logits_to_probs(logits[0, 0], whole)
    assert counts[want == 0].sum() == 0 and (counts - want).abs().max() < 0.015, (counts, want)
