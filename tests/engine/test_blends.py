"""Prompt blends in the engine: one conditional row per text and the null row, mixed as
`null + g * (sum_i w_i * cond_i - null)` (engine/rows.py, engine/batch.py).

Tiny models in float32: a blend of one plays exactly a plain prompt; a two-text blend's logits
are the formula over `MusicgenForConditionalGeneration`'s own forward of each text
(teacher-forced); stations with blends of different sizes, batched, equal the same streams
alone; our int8 kernels (one-call step, int8 and int4 caches) take blend rows as the op-by-op
decoder does; the static step mixes them as the eager engine does.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine import Blend, LoadOptions, MusicModel, SamplingOptions, WindowOptions, kernels
from engine.conditioning import condition_rows, stack_rows
from engine.rows import Prompt, mix_rows
from engine.token_stream import TokenStream
from tests.engine.guidance import assert_formula, capture_sampler
from tests.engine.reference import reference_rows
from tests.engine.steps import (
    assert_static_equals_eager,
    assert_steps_agree,
    first_mismatch,
    projected,
)

GREEDY = SamplingOptions(greedy=True)
JAZZ_RAIN = Blend.parse(
    [{"text": "slow rainy day jazz", "weight": 0.7}, {"text": "rain on a window", "weight": 0.3}]
)


def _model(path, quantize: str = "none", kv_cache: str = "auto", **kw) -> MusicModel:
    return MusicModel.load(
        LoadOptions(
            model=path, device="cpu", dtype="float32", quantize=quantize, kv_cache=kv_cache, **kw
        )
    )


@pytest.fixture
def model(tiny_float32) -> MusicModel:
    return tiny_float32


# ---- a blend of one is a plain prompt ----------------------------------------------------------


def test_a_blend_of_one_is_token_identical_to_the_plain_prompt(model):
    window = WindowOptions(window=120, context=60)
    plain = model.open_stream("slow rainy day jazz", GREEDY, window)
    blend = model.open_stream(
        Blend.parse([{"text": "slow rainy day jazz", "weight": 5}]), GREEDY, window
    )
    for s in (plain, blend):
        s.tokens.generate_until(40)
        s.set_prompt("heavy rock", from_frame=30)
        s.tokens.generate_until(200)  # windows restart
    assert blend.tokens.rows == plain.tokens.rows == 2
    got, want = blend.tokens.history()[0][:, :200], plain.tokens.history()[0][:, :200]
    assert torch.equal(got, want), first_mismatch(got, want)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_text_blended_with_itself_is_the_text(tiny_model_dir, quantize):
    """Two rows of the same text at weights 1/2 go through the mixing (0.5 c + 0.5 c = c
    exactly in float32): greedy tokens identical to the plain prompt's, over window restarts."""
    if quantize == "int8" and kernels.unavailable_reason() is not None:
        pytest.skip(f"needs our kernels: {kernels.unavailable_reason()}")
    m = _model(tiny_model_dir, quantize)
    window = WindowOptions(window=110, context=55)
    text = "fast drum and bass"
    twice = Prompt(((m.encode_prompt(text), 0.5), (m.encode_prompt(text), 0.5)))
    streams = [
        TokenStream(m.decoder, p, GREEDY, window, audio_channels=1)
        for p in (m.encode_prompt(text), twice)
    ]
    for s in streams:
        s.generate_until(240)
    assert streams[1].rows == 3
    got, want = streams[1].history()[0][:, :240], streams[0].history()[0][:, :240]
    assert torch.equal(got, want), first_mismatch(got, want)


# ---- the formula, against the reference's own forward ------------------------------------------


def test_two_text_blend_logits_are_the_formula_over_the_reference(model, monkeypatch):
    """Greedy, guidance 3, 0.7 / 0.3: each step's weighted conditional row and null row equal
    the reference's forward of each text over the same tokens."""
    seen = capture_sampler(monkeypatch)
    stream = model.open_stream(JAZZ_RAIN, SamplingOptions(greedy=True, guidance_scale=3.0))
    assert stream.tokens.rows == 3
    stream.tokens.generate_until(40)
    frames = stream.tokens.history()[0][:, :40]
    ref = reference_rows(model, list(JAZZ_RAIN.texts), frames)  # [3, 41, K, V]
    # capture i samples position i + 1 from the inputs up to position i
    for i in range(len(seen) - 1):
        if i < ref.shape[1]:
            assert_formula(seen[i], ref[:, i], list(JAZZ_RAIN.weights), f"position {i + 1}")
    assert len(seen) >= 40


# ---- batched equals alone ----------------------------------------------------------------------

BLENDS = [
    JAZZ_RAIN,
    Blend.of("fast drum and bass with a long bright synth lead"),
    Blend.parse([{"text": "ambient"}, {"text": "harp", "weight": 2}, {"text": "choir"}]),
    Blend.parse([{"text": "rain", "weight": 1}, {"text": "", "weight": 1}]),  # "" : the null text
]


@pytest.mark.parametrize(
    ("quantize", "kv_cache"), [("none", "auto"), ("int8", "auto"), ("int8", "int4")]
)
def test_batched_blends_equal_the_streams_alone(
    tiny_model_dir, tiny_head64_dir, quantize, kv_cache
):
    """Stations of 2, 1, 3 and 2 texts (one with guidance off), windows restarting at shifted
    moments, one station changing to a blend of another size mid-window (the batch lays its
    rows out anew, the others keep their caches) and one gliding: token for token alone."""
    if quantize == "int8" and kernels.unavailable_reason() is not None:
        pytest.skip(f"needs our kernels: {kernels.unavailable_reason()}")
    m = _model(tiny_head64_dir if kv_cache == "int4" else tiny_model_dir, quantize, kv_cache)
    window = WindowOptions(window=110, context=55)
    samplings = [GREEDY] * 3 + [SamplingOptions(greedy=True, guidance_scale=1.0)]
    batched = m.open_streams(BLENDS, samplings, window)
    alone = [m.open_stream(b, s, window) for b, s in zip(BLENDS, samplings, strict=True)]
    for streams in (batched, alone):
        streams[1].tokens.generate_until(40)
        streams[1].set_prompt(BLENDS[2], from_frame=30)  # 1 text -> 3
        streams[0].tokens.generate_until(70)
        streams[0].set_prompt("heavy rock", from_frame=60, transition_seconds=0.5)  # 25 frames
        for s in streams:
            s.tokens.generate_until(260)  # several windows each, at shifted positions
    assert [s.tokens.rows for s in batched] == [2, 4, 4, 3]  # the glide is over: 1 text + null
    assert batched[0].tokens._batch.cache.batch == 13
    for b, a in zip(batched, alone, strict=True):
        got, want = b.tokens.history()[0][:, :260], a.tokens.history()[0][:, :260]
        assert torch.equal(got, want), first_mismatch(got, want)


# ---- our kernels and the static step take blend rows -------------------------------------------


def _blend_steps(model: MusicModel, fused: bool, groups: list[list[str]], steps: int):
    """Teacher-forced decode steps of stations whose rows are a blend's texts and the null row
    (`condition_rows`), each at its own positions, on the one-call step or op by op: the
    sampler's inputs [steps, stations * 2, K, V] (`mix_rows`, weights 1/n)."""
    decoder = model.decoder
    saved = decoder._fused
    decoder._fused = saved if fused else None
    try:
        torch.manual_seed(1)
        texts = [condition_rows([model.encode_prompt(t) for t in g], null=True) for g in groups]
        with projected(decoder):  # as the op-by-op path: folded rows are compared elsewhere
            cross = decoder.cross_kv(*stack_rows([s for s, _ in texts], [m for _, m in texts]))
        counts = [len(g) + 1 for g in groups]
        firsts = [sum(counts[:i]) for i in range(len(groups))]
        mix = [(f, [1 / len(g)] * len(g), f + len(g)) for f, g in zip(firsts, groups, strict=True)]
        rows = sum(counts)
        cache = decoder.new_cache(rows + 2, 64).rows(1, rows)
        out = []
        for p in range(steps):
            at = [p + 5 * i for i, n in enumerate(counts) for _ in range(n)]
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            out.append(mix_rows(decoder.decode_one_step(ids, cache, cross, at), mix, 2))
        return torch.stack(out)
    finally:
        decoder._fused = saved


GROUPS = [["slow jazz", "rain on a window"], ["ambient"], ["a b c", "harp", "fast drum and bass"]]


def test_fused_int8_step_takes_blend_rows(k, tiny_model_dir):
    m = _model(tiny_model_dir, "int8")
    assert m.decoder._fused is not None
    got, want = _blend_steps(m, True, GROUPS, 30), _blend_steps(m, False, GROUPS, 30)
    assert got.shape == (30, 6, m.num_codebooks, m.decoder.vocab)
    assert_steps_agree(got, want, share=0.98)


def test_fused_step_over_int4_cache_takes_blend_rows(k, tiny_head64_dir):
    m = _model(tiny_head64_dir, "int8", "int4")
    assert m.decoder._fused is not None and m.decoder.kv_cache == "int4"
    got, want = _blend_steps(m, True, GROUPS, 30), _blend_steps(m, False, GROUPS, 30)
    assert_steps_agree(got, want, share=0.8)  # a key's nibble that flips stays in the cache


def test_int4_weights_take_blend_rows(tiny_head64_dir):
    """int4 projections (no one-call step): a blend batched equals it alone."""
    from engine.kernels import int4

    if int4.unavailable_reason() is not None:
        pytest.skip(f"the int4 kernel cannot run here: {int4.unavailable_reason()}")
    m = _model(tiny_head64_dir, "int4")
    window = WindowOptions(window=110, context=55)
    batched = m.open_streams([JAZZ_RAIN, BLENDS[2]], [GREEDY, GREEDY], window)
    alone = m.open_stream(JAZZ_RAIN, GREEDY, window)
    for s in (batched[0], alone):
        s.tokens.generate_until(150)
    got, want = batched[0].tokens.history()[0][:, :150], alone.tokens.history()[0][:, :150]
    assert torch.equal(got, want), first_mismatch(got, want)


def test_static_step_mixes_blends_as_the_eager_engine(model):
    """The static step (eagerly on the CPU) with stations of 2, 1 and 3 texts and a glide:
    the eager engine's greedy tokens."""
    window = WindowOptions(window=120, context=60)

    def play():
        streams = model.open_streams(BLENDS[:3], [GREEDY] * 3, window)
        streams[1].tokens.generate_until(40)
        streams[1].set_prompt(JAZZ_RAIN, from_frame=30, transition_seconds=0.4)
        return streams

    assert_static_equals_eager(model, play, 200)


@pytest.mark.slow
def test_compiled_step_mixes_blends_as_the_eager_engine(model, caplog):
    """torch.compile (default mode, no graphs) on the CPU traces the blend mixing (`Mix`) too:
    a blend station and a plain one, greedy tokens equal to the eager engine's."""
    window = WindowOptions(window=120, context=60)
    results = []
    for compile in ("none", "compile"):
        model.compile = compile
        try:
            with caplog.at_level(logging.WARNING, logger="engine.static_step"):
                streams = model.open_streams([JAZZ_RAIN, "heavy rock"], [GREEDY] * 2, window)
                for s in streams:
                    s.tokens.generate_until(40)
        finally:
            model.compile = "none"
        results.append([s.tokens.history()[0][:, :40] for s in streams])
    assert "could not be compiled" not in caplog.text
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want), first_mismatch(got, want)
