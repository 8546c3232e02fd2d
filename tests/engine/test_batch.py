"""Streams batched into one decoder step give, token for token, what they give alone."""

from __future__ import annotations

import pytest
import torch

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions, kernels

PROMPTS = ["slow jazz", "fast drum and bass with a long bright synth lead", "", "rain"]


def _model(path, quantize: str = "none", kv_cache: str = "auto") -> MusicModel:
    return MusicModel.load(
        LoadOptions(model=path, device="cpu", dtype="float32", quantize=quantize, kv_cache=kv_cache)
    )


@pytest.mark.parametrize(
    ("quantize", "kv_cache"), [("none", "auto"), ("int8", "auto"), ("int8", "int4")]
)
def test_batched_streams_equal_unbatched_greedy(
    tiny_model_dir, tiny_head64_dir, quantize, kv_cache
):
    """Different prompts (and text lengths), one guidance-off stream, windows restarting at
    different moments (a prompt change desynchronises one stream): still token for token.
    int8 (the CPU default) on our kernels too: activations are quantized per row, so a row's
    result does not depend on the rows batched with it; and over the int4 cache (heads of 64)."""
    if quantize == "int8" and kernels.unavailable_reason() is not None:
        pytest.skip(
            f"int8 rows are independent only on our kernels: {kernels.unavailable_reason()}"
        )
    path = tiny_head64_dir if kv_cache == "int4" else tiny_model_dir
    model = _model(path, quantize, kv_cache)
    assert model.decoder.kv_cache == kv_cache or kv_cache == "auto"
    assert quantize == "none" or model.decoder._fused is not None
    window = WindowOptions(window=110, context=55)
    samplings = [SamplingOptions(greedy=True)] * 3 + [
        SamplingOptions(greedy=True, guidance_scale=1.0)
    ]
    batched = model.open_streams(PROMPTS, samplings, window)
    alone = [model.open_stream(p, s, window) for p, s in zip(PROMPTS, samplings, strict=True)]
    for streams in (batched, alone):
        streams[1].tokens.generate_until(40)
        streams[1].set_prompt("heavy rock", from_frame=30)  # stream 1 re-prefills on its own
        for s in streams:
            s.tokens.generate_until(260)  # several windows each, at shifted positions
    assert batched[0].tokens._batch is not None and batched[0].tokens._batch.steps > 200
    for b, a in zip(batched, alone, strict=True):
        got, want = b.tokens.history()[0][:, :260], a.tokens.history()[0][:, :260]
        assert torch.equal(got, want), f"first mismatch at {(got != want).nonzero()[0].tolist()}"


@pytest.mark.parametrize("top_p", [0.9, 0.0])
def test_batched_streams_sample_what_they_sample_alone(tiny_model_dir, top_p):
    """Sampling (top-k 250, seeded, guidance 3 and 1, one stream at temperature 0.7, with top-p
    or not): the batch guides, takes the top-k, the softmax and the draws once for all streams,
    each stream's uniforms from its own generator; the tokens equal each stream's alone, draw
    for draw (int8 on our kernels: a row's logits do not depend on the rows batched with it)."""
    if kernels.unavailable_reason() is not None:
        pytest.skip(f"needs our kernels: {kernels.unavailable_reason()}")
    model = _model(tiny_model_dir, "int8")
    window = WindowOptions(window=110, context=55)
    samplings = [
        SamplingOptions(seed=1),
        SamplingOptions(seed=2, guidance_scale=1.0),
        SamplingOptions(seed=3, temperature=0.7, top_p=top_p),
    ]
    prompts = PROMPTS[:3]
    batched = model.open_streams(prompts, samplings, window)
    alone = [model.open_stream(p, s, window) for p, s in zip(prompts, samplings, strict=True)]
    for streams in (batched, alone):
        for s in streams:
            s.tokens.generate_until(120)
    for b, a in zip(batched, alone, strict=True):
        got, want = b.tokens.history()[0][:, :120], a.tokens.history()[0][:, :120]
        assert torch.equal(got, want), f"first mismatch at {(got != want).nonzero()[0].tolist()}"
    assert not torch.equal(batched[0].tokens.history()[0], batched[1].tokens.history()[0])


def test_batched_streams_read_audio(tiny_stereo_dir):
    model = _model(tiny_stereo_dir)
    streams = model.open_streams(
        ["jazz", "rock"], [SamplingOptions(seed=1), SamplingOptions(seed=2)]
    )
    a, b = streams[0].read(30), streams[1].read(30)
    assert a.shape == b.shape == (2, 30 * 640)
    assert not torch.equal(torch.from_numpy(a), torch.from_numpy(b))


@torch.inference_mode()
def test_concatenated_cross_inputs_are_those_of_the_stacked_texts(tiny_float32):
    """A batch stacks its lanes' cross-attention inputs without projecting the texts again:
    texts of other lengths zero-padded, as `cross_kv` of the stacked, padded states gives."""
    from engine.conditioning import condition_rows, stack_rows
    from engine.decoder import concat_cross

    decoder = tiny_float32.decoder
    lanes = [
        condition_rows([tiny_float32.encode_prompt(text)], null)
        for text, null in (
            ("fast drum and bass with a long bright synth lead", True),
            ("rain", False),
        )
    ]
    own = [decoder.cross_kv(states, masks) for states, masks in lanes]
    assert own[0].mask.shape[-1] > own[1].mask.shape[-1]
    got = concat_cross([own[0], own[1], own[0]])
    want = decoder.cross_kv(*stack_rows(*zip(*[lanes[0], lanes[1], lanes[0]], strict=True)))
    assert torch.equal(got.mask, want.mask)
    for a, b in zip(got.keys + got.values, want.keys + want.values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert concat_cross([own[1]]) is own[1]
