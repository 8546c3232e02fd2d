"""The static-shape decoder step (`engine/static_step.py`) equals the eager engine.

On the CPU, with the tiny float32 model: the step's logits over its fixed buffers (text padded to
`TEXT_BUCKET`, masked) equal `Decoder.decode_one_step`'s over the prompt as it is; its in-graph
sampling (`engine.sampling.sample_tensors`) equals `logits_to_probs` and draws from it;
greedy streams (alone and batched) give the eager engine's tokens, eagerly and compiled with
`torch.compile`; a compile that fails is logged and runs eagerly. On a GPU (marker `gpu`, skipped
without one): CUDA graphs give the eager tokens, and the speed is printed.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions, static_step
from engine.blend import Blend
from engine.conditioning import batch_conditions
from engine.sampling import logits_to_probs, probs_from, sample_tensors, settings_tensor
from engine.static_step import StaticStep
from tests.engine.steps import assert_static_equals_eager

WINDOW = WindowOptions(window=120, context=60)
GREEDY = SamplingOptions(greedy=True)
THREE = Blend.weighted([("bells", 1.0), ("strings", 2.0), ("drums", 1.0)])  # a blend of 3


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MusicModel:
    return MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", compile="none")
    )


def _tokens(model: MusicModel, compile: str, frames: int, sampling=GREEDY) -> torch.Tensor:
    """Frames [K, frames] of one stream whose steps run with `compile`."""
    model.compile = compile
    try:
        stream = model.open_stream("slow rainy day jazz", sampling, WINDOW)
        stream.tokens.generate_until(frames)
    finally:
        model.compile = "none"
    return stream.tokens.history()[0][:, :frames]


@torch.inference_mode()
def test_logits_over_the_masked_cache_equal_decode_one_step(model):
    """Two streams (cond and null row each), the second two positions behind the first, teacher
    forced with random tokens: the static step's logits and cache writes equal the eager step's."""
    decoder = model.decoder
    prompts = [model.encode_prompt("slow jazz"), model.encode_prompt("fast drum and bass")]
    states, mask = batch_conditions(prompts, guidance=True)
    order = [0, 2, 1, 3]  # rows (cond, null) per stream, as a DecodeBatch holds them
    cross = decoder.cross_kv(states[order], mask[order])
    eager, static = decoder.new_cache(4, 40), decoder.new_cache(4, 40)
    torch.manual_seed(0)
    prefill = torch.randint(0, 2048, (1, 4, 8)).expand(4, -1, -1)
    decoder.prefill(prefill, eager, cross)
    decoder.prefill(prefill, static, cross)
    step = StaticStep(decoder, "eager")
    for p in range(8, 20):
        ids = torch.randint(0, 2048, (4, 4))
        rows_at = [p, p, p - 2, p - 2]
        want = decoder.decode_one_step(ids, eager, cross, rows_at)
        got = step.logits(ids, torch.tensor(rows_at), static, cross)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.keys, eager.keys, atol=1e-6, rtol=1e-6)


@torch.inference_mode()
def test_step_writes_and_reads_only_up_to_each_rows_position(model):
    """`Decoder.step_logits`, the step of the eager engine without our kernels and of the static
    step: each row writes its key and value at its own position alone, and what the cache holds
    beyond that position (an earlier window's keys, another row's) changes nothing."""
    decoder = model.decoder
    prompts = [model.encode_prompt("slow jazz"), model.encode_prompt("heavy rock")]
    cross = decoder.cross_kv(*batch_conditions(prompts, guidance=False))
    torch.manual_seed(2)
    keys, values = decoder.new_cache(2, 40).tensors()
    keys.normal_(), values.normal_()
    positions, ids = torch.tensor([5, 30]), torch.randint(0, 2048, (2, 4))
    stale_keys, stale_values = keys.clone(), values.clone()
    logits = decoder.step_logits(ids, positions, keys, values, cross.keys, cross.values, cross.mask)
    written = (keys != stale_keys).any(dim=4).any(dim=2).any(dim=0)  # [B, P]
    assert written.nonzero().tolist() == [[0, 5], [1, 30]]
    for row, p in enumerate(positions.tolist()):
        stale_keys[:, row, :, p + 1 :] *= 100
        stale_values[:, row, :, p + 1 :] = -stale_values[:, row, :, p + 1 :]
    again = decoder.step_logits(
        ids, positions, stale_keys, stale_values, cross.keys, cross.values, cross.mask
    )
    assert torch.equal(again, logits)


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(),
        SamplingOptions(temperature=0.7, top_k=5),
        SamplingOptions(top_k=0, top_p=0.9),
        SamplingOptions(temperature=1.3, top_k=40, top_p=0.5),
    ],
)
def test_in_graph_probabilities_equal_logits_to_probs(options):
    logits = torch.randn(2, 4, 2048, generator=torch.Generator().manual_seed(1))
    settings = settings_tensor([options, options], 2048, "cpu")
    torch.testing.assert_close(probs_from(logits, settings), logits_to_probs(logits, options))


def test_exponential_race_draws_from_the_probabilities():
    """argmax(probs / E), E ~ Exp(1): each token wins as often as its probability says."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0]))[None, None]
    settings = settings_tensor([SamplingOptions(top_k=0, guidance_scale=1.0)], 8, "cpu")
    draws = 20000
    noise = torch.empty(draws, 1, 8).exponential_(generator=torch.Generator().manual_seed(0))
    tokens = sample_tensors(logits.expand(draws, -1, -1), None, settings.expand(draws, -1), noise)
    share = torch.bincount(tokens.flatten(), minlength=8) / draws
    torch.testing.assert_close(
        share, torch.tensor([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0]), atol=0.015, rtol=0
    )


def test_greedy_stream_equals_the_eager_engine(model):
    """Over several windows (re-prefills stay eager, steps run the static step)."""
    assert torch.equal(_tokens(model, "eager", 260), _tokens(model, "none", 260))


def test_seeded_sampling_is_reproducible_and_keeps_top_k(model):
    sampling = SamplingOptions(seed=7, top_k=3)
    first, again = _tokens(model, "eager", 60, sampling), _tokens(model, "eager", 60, sampling)
    assert torch.equal(first, again)
    assert not torch.equal(first, _tokens(model, "eager", 60, SamplingOptions(seed=8, top_k=3)))


def test_batched_streams_equal_the_eager_batch(model):
    """Stations in one batch, one with guidance off, one re-prefilling on its own."""
    prompts = ["slow jazz", "fast drum and bass with a long bright synth lead", ""]
    samplings = [GREEDY, SamplingOptions(greedy=True, guidance_scale=1.0), GREEDY]

    def play():
        streams = model.open_streams(prompts, samplings, WINDOW)
        streams[1].tokens.generate_until(40)
        streams[1].set_prompt("heavy rock", from_frame=30)  # its windows shift
        return streams

    assert_static_equals_eager(model, play, 200)


def test_a_blend_with_guidance_dropped_is_sampled_from_the_blend_alone(model):
    """Guidance dropped (the radio's last rung) on a station playing a blend of three: it is
    sampled from the blend's rows alone, as on the eager engine (the static step guided it with
    its own scale against its first text's row, pushing the blend away from that text)."""

    def play():
        streams = model.open_streams(["jazz", "rock"], [GREEDY] * 2, WINDOW)
        streams[1].set_prompt(THREE, from_frame=0)
        model.drop_guidance(True)
        return streams

    try:
        assert_static_equals_eager(model, play, 60)
    finally:
        model.drop_guidance(False)


def test_transitions_move_rows_within_one_cache(model):
    """On the static step (a GPU's), a transition's glide rows come and go inside the cache's
    own buffers: after the first one made room, a second transition allocates nothing (no
    second cache beside the first, the step reads at the same addresses), and the tokens equal
    the eager engine's."""
    buffers = []

    def play():
        streams = model.open_streams(["jazz", "rock", "pop"], [GREEDY] * 3, WINDOW)
        batch = streams[0].tokens._batch
        streams[1].set_prompt("blues", from_frame=0, transition_seconds=0.3)
        streams[1].tokens.generate_until(30)  # the glide is over: its rows have gone
        buffers.append(batch.cache.keys.untyped_storage().data_ptr())
        streams[0].set_prompt("bells", from_frame=30, transition_seconds=0.3)
        streams[0].tokens.generate_until(40)  # gliding: a row more than before
        buffers.append(batch.cache.keys.untyped_storage().data_ptr())
        return streams

    assert_static_equals_eager(model, play, 60)
    eager, static = buffers[:2], buffers[2:]
    assert static[0] == static[1], "the static step's second transition took a new cache"
    assert eager[0] != eager[1]  # (the eager step's cache and spare take turns)


@pytest.mark.slow
def test_compiled_step_equals_the_eager_engine(model, capsys):
    """torch.compile (default mode, no graphs) on the CPU: greedy tokens equal, and changing the
    sampling settings does not compile again (they are tensors)."""
    from torch._dynamo.utils import counters

    began = time.perf_counter()
    compiled = _tokens(model, "compile", 40)
    seconds = time.perf_counter() - began
    assert torch.equal(compiled, _tokens(model, "none", 40))
    graphs = counters["stats"]["unique_graphs"]
    _tokens(model, "compile", 40, SamplingOptions(seed=1, top_k=50, top_p=0.9, temperature=0.8))
    assert counters["stats"]["unique_graphs"] == graphs
    with capsys.disabled():
        print(f"\ncompile + 40 frames of the tiny model: {seconds:.1f} s")


def test_new_row_layouts_reuse_one_compiled_step(model, caplog):
    """torch.compile (Inductor, on the CPU): the first layout compiles, the second compiles its
    changed dims as symbols, and every later layout (3, 4, 1, 5 stations) runs that code, the
    tokens equal the eager step's. Compiled one shape at a time, each station count was a
    compile of its own (minutes on a GPU) and the 9th ran eagerly for good."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = []
    with caplog.at_level(logging.WARNING, logger="engine.static_step"):
        for stations in (1, 2, 3, 4, 1, 5):
            tokens = {}
            for compile in ("compile", "none"):
                model.compile = compile
                try:
                    streams = model.open_streams(["jazz"] * stations, [GREEDY] * stations, WINDOW)
                    for stream in streams:
                        stream.tokens.generate_until(20)
                finally:
                    model.compile = "none"
                tokens[compile] = [s.tokens.history()[0][:, :20] for s in streams]
            assert all(map(torch.equal, tokens["compile"], tokens["none"])), stations
            graphs.append(counters["stats"]["unique_graphs"])
    assert "could not be compiled" not in caplog.text
    assert graphs[1] - graphs[0] <= 1 and graphs[-1] == graphs[1], graphs
    torch._dynamo.reset()


def test_one_compile_serves_every_row_layout_a_radio_meets(model, caplog):
    """Two stations, compiled once: a transition's glide rows, a blend of three, a prompt longer
    than a text bucket, guidance off, each a new row layout, run the code compiled for
    the first (every dim they change a symbol from the start), and the tokens equal the eager
    step's. Each was a compile of its own, on the generator's thread while on air (three here,
    7-13 s each for this tiny model on a CPU)."""
    from torch._dynamo.utils import counters

    long = " ".join(["a long prompt about slow rainy day jazz on a quiet afternoon"] * 8)

    def play(compile: str) -> tuple[list[torch.Tensor], int]:
        model.compile = compile
        try:
            streams = model.open_streams(["jazz", "rock"], [GREEDY] * 2, WINDOW)
            played = 0

            def until(frame: int) -> None:
                for stream in streams:
                    stream.tokens.generate_until(frame)

            until(20)
            graphs = counters["stats"]["unique_graphs"]  # the first layout's compile is done
            streams[0].set_prompt("blues", from_frame=20, transition_seconds=0.5)
            until(60)
            streams[1].set_prompt(THREE, from_frame=60)
            until(100)
            streams[0].set_prompt(long, from_frame=100)
            until(130)
            # (not back on before a restart: the eager step's warm rows take the null rows back
            # a window later than a prefill does)
            model.drop_guidance(True)
            until(150)
            played = counters["stats"]["unique_graphs"] - graphs
        finally:
            model.compile = "none"
            model.drop_guidance(False)
        return [s.tokens.history()[0][:, :150] for s in streams], played

    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="engine.static_step"):
        compiled, compiles = play("compile")
    eager, _ = play("none")
    assert compiles == 0
    assert caplog.text.count("the decoder step compiled in") == 1, caplog.text
    assert "compiled again" not in caplog.text
    assert all(map(torch.equal, compiled, eager))
    torch._dynamo.reset()


def test_a_new_thread_count_does_not_compile_the_step_again(model):
    """Dynamo guards on torch's thread count, which the radio's thread tuner moves between
    reads: the compiled step runs on the count of its first call and leaves the caller's as it
    found it, so a new count compiles nothing."""
    from torch._dynamo.utils import counters

    saved = torch.get_num_threads()
    torch._dynamo.reset()
    model.compile = "compile"
    try:
        torch.set_num_threads(2)
        stream = model.open_stream("jazz", GREEDY, WINDOW)
        stream.tokens.generate_until(10)
        graphs = counters["stats"]["unique_graphs"]
        torch.set_num_threads(1)
        stream.tokens.generate_until(20)
        assert counters["stats"]["unique_graphs"] == graphs
        assert torch.get_num_threads() == 1
    finally:
        model.compile = "none"
        torch.set_num_threads(saved)
        torch._dynamo.reset()


@pytest.mark.slow
def test_a_compile_while_on_air_is_logged(model, monkeypatch, caplog):
    """A row layout the compiled code does not fit (here: the sizes left unmarked, as before
    the step marked them) compiles again while the stations wait: a warning says so."""
    monkeypatch.setattr(static_step, "_layout_dims_dynamic", lambda args, sampling: None)
    torch._dynamo.reset()
    model.compile = "compile"
    try:
        with caplog.at_level(logging.INFO, logger="engine.static_step"):
            streams = model.open_streams(["jazz", "rock"], [GREEDY] * 2, WINDOW)
            streams[0].tokens.generate_until(10)
            assert "the decoder step compiled in" in caplog.text
            assert "compiled again" not in caplog.text
            streams[1].set_prompt(THREE, from_frame=10)
            streams[1].tokens.generate_until(20)
    finally:
        model.compile = "none"
        torch._dynamo.reset()
    assert "the decoder step compiled again in" in caplog.text
    assert "a row layout of 6 rows and 2 streams" in caplog.text


def test_a_failing_compile_is_logged_and_runs_eagerly(model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("compiler unavailable in this test")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="engine.static_step"):
        tokens = _tokens(model, "compile", 40)
    assert "could not be compiled" in caplog.text
    assert "RuntimeError: compiler unavailable in this test" in caplog.text
    assert torch.equal(tokens, _tokens(model, "none", 40))


def test_a_failing_first_call_is_logged_and_runs_eagerly(model, monkeypatch, caplog):
    """A capture that fails when the step first runs (not when it is wrapped)."""

    def compile_that_fails_later(fn, **kwargs):
        def run(*args, **kw):
            raise torch._dynamo.exc.Unsupported("cannot trace this in this test")

        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails_later)
    with caplog.at_level(logging.WARNING, logger="engine.static_step"):
        tokens = _tokens(model, "graphs", 40)
    assert caplog.text.count("could not be compiled") == 1
    assert "Unsupported: cannot trace this" in caplog.text
    assert torch.equal(tokens, _tokens(model, "none", 40))


def test_int8_decoder_falls_back_to_eager(tiny_model_dir, caplog):
    """The int8 kernels are outside what torch.compile traces: a real fallback."""
    options = LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8", compile="compile")
    model = MusicModel.load(options)
    assert model.compile == "compile"
    with caplog.at_level(logging.WARNING, logger="engine.static_step"):
        tokens = _tokens(model, "compile", 30)
    assert "could not be compiled" in caplog.text
    assert torch.equal(tokens, _tokens(model, "none", 30))


def test_compiled_step_without_our_kernels_keeps_a_float32_cache(tiny_model_dir, monkeypatch):
    """Where our CPU kernels cannot run, a compiled int8 decoder's cache is float32 (the one
    PyTorch attends to fast), not the bfloat16 one our kernels read."""
    from engine import kernels

    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "0")
    monkeypatch.setitem(kernels._state, "module", None)
    options = LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8", compile="compile")
    model = MusicModel.load(options)
    assert model.decoder.kv_cache == "float32" and model.decoder.kernels is None
    assert torch.equal(_tokens(model, "eager", 8), _tokens(model, "none", 8))


def test_compile_option(tiny_model_dir):
    with pytest.raises(ValueError, match="compile: must be one of"):
        LoadOptions(compile="fast").validate()
    with pytest.raises(ValueError, match="compile: graphs need a CUDA device"):
        LoadOptions(compile="graphs", device="cpu").validate()
    # what "auto" chooses on a CPU and a GPU: tests/engine/test_settings.py
    auto = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))
    assert auto.compile == "none"
    with pytest.raises(ValueError, match="mode must be one of"):
        StaticStep(auto.decoder, "fast")


# ---- on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_model(tiny_model_dir) -> MusicModel:
    return MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cuda", dtype="float32", compile="none")
    )


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_on_cuda(cuda_model, capsys):
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    graphs = _tokens(cuda_model, "graphs", 120)
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were not captured"
    assert torch.equal(graphs, _tokens(cuda_model, "none", 120))
    rates = {}
    timed = WindowOptions(window=1000, context=100)
    for compile in ("none", "graphs"):
        cuda_model.compile = compile
        try:  # a warm-up of the timed shape first: its compile and capture are not timed
            cuda_model.open_stream("jazz", GREEDY, timed).tokens.generate_until(20)
            stream = cuda_model.open_stream("jazz", GREEDY, timed)
            torch.cuda.synchronize()
            began = time.perf_counter()
            stream.tokens.generate_until(500)
            torch.cuda.synchronize()
            rates[compile] = stream.tokens.steps / (time.perf_counter() - began)
        finally:
            cuda_model.compile = "none"
    with capsys.disabled():
        print(f"\ntiny model on {torch.cuda.get_device_name()}: steps/s {rates}")


@pytest.mark.gpu
def test_cuda_graphs_batched_stations_equal_eager(cuda_model):
    prompts, samplings = ["jazz", "rock"], [GREEDY, GREEDY]
    results = []
    for compile in ("none", "graphs"):
        cuda_model.compile = compile
        streams = cuda_model.open_streams(prompts, samplings, WINDOW)
        for s in streams:
            s.tokens.generate_until(150)
        cuda_model.compile = "none"
        results.append([s.tokens.history()[0][:, :150] for s in streams])
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want)
