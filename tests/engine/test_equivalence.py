"""The engine's incremental decoding equals the reference `transformers` model.

Tiny random-weight models in float32: teacher-forced logits against a full forward pass, and
greedy token streams against `MusicgenForConditionalGeneration.generate`, mono and stereo,
guidance on and off, fresh starts and continuations from given tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.conditioning import encode_prompt
from engine.decoder import Decoder
from engine.delay import codebook_delays, delayed_layout
from engine.musicgen import MusicGen
from engine.options import SamplingOptions, WindowOptions
from engine.token_stream import TokenStream
from tests.engine.reference import reference_tokens, transformers_model

PROMPT = "slow rainy day jazz"
STEPS = 256


def _load(path):
    """(transformers' model, its processor, ours: `engine.musicgen`) of the same weights."""
    return (*transformers_model(path), MusicGen.load(Path(path)))


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def stereo(tiny_stereo_dir):
    return _load(tiny_stereo_dir)


def _comparable_frames(steps: int, model) -> int:
    """Frames of a reference run of `steps` steps untouched by its end-of-sequence padding.

    `generate` pads the last positions of the delayed codebooks (it stops at max_length); the
    endless stream never does. Tokens at positions before the first such pad agree.
    """
    channel_codebooks = model.decoder.config.num_codebooks // model.decoder.config.audio_channels
    max_delay = channel_codebooks - 1
    return steps + 2 - channel_codebooks - max_delay


def _stream(ours, prompt, guidance, window=None, prompt_frames=None):
    return TokenStream(
        Decoder(ours.decoder),
        encode_prompt(ours, prompt),
        SamplingOptions(guidance_scale=guidance, greedy=True),
        window or WindowOptions(window=1900, context=500),
        audio_channels=ours.decoder.config.audio_channels,
        prompt_frames=prompt_frames,
    )


def _assert_streams_agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    mismatch = (ours != ref).nonzero()
    assert mismatch.numel() == 0, (
        f"first mismatch (codebook, frame): {mismatch[0].tolist()} of {ours.shape}"
    )


@pytest.mark.parametrize("which", ["mono", "stereo"])
@pytest.mark.parametrize("guidance", [3.0, 1.0])
@torch.inference_mode()
def test_greedy_tokens_equal_reference_generate(which, guidance, request):
    model, processor, ours = request.getfixturevalue(which)
    ref = reference_tokens(model, processor, PROMPT, STEPS, guidance)
    frames = _comparable_frames(STEPS, model)
    assert frames >= 250
    stream = _stream(ours, PROMPT, guidance)
    stream.generate_until(frames)
    _assert_streams_agree(stream.history()[0][:, :frames], ref[:, :frames])


@torch.inference_mode()
def test_unconditional_equals_reference(mono):
    model, processor, ours = mono
    ref = reference_tokens(model, processor, "", 120, 1.0)
    frames = _comparable_frames(120, model)
    stream = _stream(ours, "", 3.0)  # guidance on an empty prompt changes nothing
    stream.generate_until(frames)
    _assert_streams_agree(stream.history()[0][:, :frames], ref[:, :frames])


@pytest.mark.parametrize("which", ["mono", "stereo"])
@torch.inference_mode()
def test_continuation_from_tokens_equals_reference(which, request):
    model, processor, ours = request.getfixturevalue(which)
    torch.manual_seed(3)
    prompt_frames = torch.randint(0, 2048, (model.decoder.config.num_codebooks, 40))
    ref = reference_tokens(model, processor, PROMPT, 150, 3.0, prompt_frames=prompt_frames)
    assert torch.equal(ref[:, :40], prompt_frames)
    frames = 40 + _comparable_frames(150, model) - 1
    stream = _stream(ours, PROMPT, 3.0, prompt_frames=prompt_frames)
    stream.generate_until(frames)
    _assert_streams_agree(stream.history()[0][:, :frames], ref[:, :frames])


@torch.inference_mode()
def test_window_restart_is_a_reference_continuation(mono):
    """After a window is full the stream re-prefills its last `context` frames: what follows
    equals the reference's continuation from exactly those frames."""
    model, processor, ours = mono
    window = WindowOptions(window=120, context=60)
    stream = _stream(ours, PROMPT, 3.0, window=window)
    stream.generate_until(260)
    assert stream.prefills >= 3
    tokens = stream.history()[0]
    # The first window writes positions up to `window`, completing frames [0, window - max_delay);
    # the second continues from the last `context` of them.
    first_window_frames = window.window - 3
    context = tokens[:, first_window_frames - 60 : first_window_frames]
    ref = reference_tokens(model, processor, PROMPT, 60, 3.0, prompt_frames=context)
    new = _comparable_frames(60, model) - 1
    _assert_streams_agree(
        tokens[:, first_window_frames : first_window_frames + new], ref[:, 60 : 60 + new]
    )


@pytest.mark.parametrize("guided_row", [0, 1])
@torch.inference_mode()
def test_teacher_forced_logits_match_full_forward(mono, guided_row):
    """Incremental steps over the KV cache give the logits of one full forward pass, for the
    conditional row and for the null (zero text) row of classifier-free guidance."""
    model, processor, ours = mono
    torch.manual_seed(0)
    frames = torch.randint(0, 2048, (4, 60))
    delays = codebook_delays(4, 1)
    ids = delayed_layout(frames, delays, 61)  # [K, 61]: frame 59 of codebook 0 is the last
    assert bool((ids >= 0).all())
    inputs = processor(text=[PROMPT], return_tensors="pt", padding=True)
    if guided_row == 0:
        forward_kwargs = dict(**inputs)
    else:
        hidden = model.text_encoder(**inputs).last_hidden_state
        forward_kwargs = dict(
            encoder_outputs=(torch.zeros_like(hidden),),
            attention_mask=torch.zeros_like(inputs["attention_mask"]),
        )
    full = model(**forward_kwargs, decoder_input_ids=ids).logits  # [K, T, V]

    decoder = Decoder(ours.decoder)
    from engine.conditioning import batch_conditions

    states, mask = batch_conditions([encode_prompt(ours, PROMPT)], guidance=True)
    cross = decoder.cross_kv(states, mask)
    cache = decoder.new_cache(2, 80)
    steps = [decoder.prefill(ids[None, :, :1].expand(2, -1, -1), cache, cross)]
    for p in range(1, 61):
        steps.append(decoder.decode_one_step(ids[None, :, p].expand(2, -1), cache, cross))
    ours = torch.stack(steps, dim=2)[guided_row]  # [K, T, V]
    torch.testing.assert_close(ours, full, atol=2e-5, rtol=1e-4)
    # A prefill of all positions at once gives the last position's logits too.
    last = decoder.prefill(ids[None].expand(2, -1, -1), cache, cross)[guided_row]
    torch.testing.assert_close(last, full[:, -1], atol=2e-5, rtol=1e-4)
