"""Sampling: the same probabilities as `transformers`' warpers, the top-k fast path draws from
exactly that distribution, and so does the kernel that samples on our CPU kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.options import SamplingOptions
from engine.sampling import logits_to_probs, sample, sample_streams, top_k_probs

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


def _inverse_cdf_in_token_order(guided: torch.Tensor, options: SamplingOptions, u: torch.Tensor):
    """float64 reference of `sample_top_k`: guided [N, K, V], uniforms [N, K] -> tokens [N, K]."""
    probs = logits_to_probs(guided.double(), options)  # zeros outside the top-k, token order
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (u.double() * cdf[..., -1])[..., None], right=True)
    return at[..., 0].clamp(max=guided.shape[-1] - 1)


def test_sample_top_k_kernel_draws_the_top_k_distribution(k):
    """Guidance, top-k, temperature, softmax and the inverse-CDF draw in one call: the tokens a
    float64 reference draws from the same uniforms (candidates in token order), all inside the
    top k, at the frequencies of `logits_to_probs`."""
    torch.manual_seed(5)
    options = SamplingOptions(temperature=0.8, top_k=20, guidance_scale=3.0)
    logits = torch.randn(2 * 3, 4, 300) * 2  # 3 streams, conditional and null rows
    u = torch.rand(3, 4)
    ones = torch.ones(3)
    got = k.sample_top_k(logits, 2, ones * 3.0, ones * 0.8, 20, u)
    cond, uncond = logits[0::2], logits[1::2]
    guided = uncond + (cond - uncond) * 3.0
    assert torch.equal(got, _inverse_cdf_in_token_order(guided, options, u))
    # one row drawn 20000 times: the frequencies of the warped distribution
    row = guided[0:1, 0:1].expand(20000, 1, -1).contiguous()
    tokens = k.sample_top_k(
        row, 1, torch.ones(20000), torch.full((20000,), 0.8), 20, torch.rand(20000, 1)
    )
    counts = torch.bincount(tokens.flatten(), minlength=300).float() / tokens.numel()
    want = logits_to_probs(guided[0, 0], options)
    assert counts[want == 0].sum() == 0 and (counts - want).abs().max() < 0.015
    # ties at the k-th largest: the lower ids, exactly k candidates
    flat = torch.zeros(1, 1, 10)
    flat[0, 0, 7] = 1.0
    drawn = {
        k.sample_top_k(flat, 1, ones[:1], ones[:1], 3, torch.tensor([[x]])).item()
        for x in (0.0, 0.99999)
    }
    assert drawn == {0, 7}  # candidates 0, 1 (ties, lowest ids) and 7; u near 1 picks the last


def test_sample_top_k_kernel_refuses_bad_input(k):
    logits, ones = torch.randn(2, 4, 50), torch.ones(1)
    with pytest.raises(RuntimeError, match="k = 0 outside"):
        k.sample_top_k(logits, 2, ones, ones, 0, torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="3 rows are not 2 per stream"):
        k.sample_top_k(torch.randn(3, 4, 50), 2, ones, ones, 5, torch.rand(1, 4))
    with pytest.raises(RuntimeError, match="stream 0 has temperature 0"):
        k.sample_top_k(logits, 2, ones, ones * 0, 5, torch.rand(1, 4))
    with pytest.raises(RuntimeError, match=r"uniforms \[1, 4\]"):
        k.sample_top_k(logits, 2, ones, ones, 5, torch.rand(4))


def test_sample_streams_alone_equals_batched_on_the_kernel(k):
    """A stream's draws do not depend on the streams sampled with it: on the kernel (top-k, two
    values of k), on PyTorch (top-p), greedy, guidance off with and without its null row."""
    torch.manual_seed(6)
    options = [
        SamplingOptions(seed=1),
        SamplingOptions(seed=2, top_p=0.9),
        SamplingOptions(seed=3, greedy=True),
        SamplingOptions(seed=4, guidance_scale=1.0, temperature=1.3),
        SamplingOptions(seed=5, top_k=40),  # another k: its own kernel call
    ]
    logits = torch.randn(10, 4, 2048)

    def generators():
        return [torch.Generator().manual_seed(o.seed) for o in options]

    batched = sample_streams(logits, options, generators(), k)
    alone = [
        sample_streams(logits[2 * i : 2 * i + 2], [o], [g], k)[0]
        for i, (o, g) in enumerate(zip(options, generators(), strict=True))
    ]
    assert torch.equal(batched, torch.stack(alone))
    # guidance off alone runs one row: the conditional row's draws
    g = generators()[3]
    assert torch.equal(sample_streams(logits[6:7], options[3:4], [g], k)[0], batched[3])
