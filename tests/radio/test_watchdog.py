"""The music watchdog (`radio.watchdog`): each detector on synthetic token frames and audio
(found within its configured time, never on random tokens), the re-anchoring plan and its
crossfade, the generator re-anchoring a fake stream, no false trigger over a long render of the
tiny models, and each problem forced on a live radio (injected silence, a looped token block, a
collapsed codebook) found, re-anchored, counted and shown in the health."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.request

import numpy as np
import pytest

from radio.config import ConfigError, WatchdogConfig, parse_config
from radio.testing import FaultInjector
from radio.watchdog import (
    BLOCK_FRAMES,
    AudioTail,
    CollapseDetector,
    Crossfade,
    LoopDetector,
    Plan,
    Problem,
    SilenceDetector,
    Watchdog,
    frame_keys,
)
from tests.helpers import call, wait_until
from tests.radio.fake_engine import CHUNK, HOP, FakeModel, frames

RATE = 50  # frames per second
K = 4  # codebooks


def random_tokens(n: int, seed: int = 0, k: int = K) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (k, n))


def chunks(tokens: np.ndarray, size: int = CHUNK):
    """[K, T] -> its [K, size] chunks, in order."""
    for i in range(0, tokens.shape[1], size):
        yield tokens[:, i : i + size]


def first_alarm(detector, tokens: np.ndarray) -> int | None:
    """The frame count at which `detector.feed` (chunk by chunk) first says yes, or None."""
    for i, chunk in enumerate(chunks(tokens)):
        if detector.feed(chunk):
            return (i + 1) * CHUNK
    return None


# ---- the detectors on synthetic frames ---------------------------------------------------


def test_silence_is_found_after_silence_seconds_of_quiet_frames():
    detector = SilenceDetector(-60.0, 5 * RATE)
    rng = np.random.default_rng(1)
    loud = rng.normal(0, 10 ** (-50 / 20), (1, 30 * RATE * HOP)).astype(np.float32)  # -50 dB
    for chunk in np.split(loud, 30 * RATE // CHUNK, axis=1):
        assert not detector.feed(chunk, CHUNK)
    quiet = rng.normal(0, 10 ** (-70 / 20), (1, 10 * RATE * HOP)).astype(np.float32)  # -70 dB
    found = [detector.feed(c, CHUNK) for c in np.split(quiet, 10 * RATE // CHUNK, axis=1)]
    assert found.index(True) == 5 * RATE // CHUNK - 1  # exactly after 5 s
    detector.reset()
    one_loud = np.zeros((1, 5 * RATE * HOP), np.float32)
    one_loud[0, 2 * RATE * HOP] = 1.0  # one loud frame in the middle restarts the count
    assert not any(detector.feed(c, CHUNK) for c in np.split(one_loud, 5 * RATE // CHUNK, axis=1))


def test_random_tokens_are_never_a_loop_and_a_looped_block_is_found_in_time():
    seconds, share = 20, 0.6
    window = seconds * RATE
    detector = LoopDetector(window, share)
    normal = random_tokens(60 * RATE)
    assert first_alarm(detector, normal) is None and detector.repeated == 0.0
    period = 2 * RATE  # 2 s of new music, then the same 2 s over and over
    loop = np.tile(random_tokens(period, seed=11), 15)
    found = first_alarm(detector, loop)
    # repeated frames = looped frames - one period - 3 (the blocks across the first join);
    # found when they make `share` of the stretch, at the end of that chunk
    assert found is not None and found <= seconds * RATE, found
    expected = share * window + period + BLOCK_FRAMES - 1
    assert expected <= found < expected + CHUNK, found
    assert detector.period == period and detector.repeated >= share


def test_a_loop_longer_than_the_stretch_allows_is_not_taken_for_one():
    detector = LoopDetector(20 * RATE, 0.6)
    tokens = random_tokens(20 * RATE, seed=2)
    repeated_once = np.concatenate([tokens, tokens[:, : 10 * RATE]], axis=1)  # a 20 s "loop"
    assert first_alarm(detector, repeated_once) is None


def test_a_collapsed_codebook_is_found_after_collapse_seconds():
    detector = CollapseDetector(10 * RATE, 6)
    normal = random_tokens(30 * RATE, seed=3)
    assert first_alarm(detector, normal) is None
    assert detector.distinct > 300  # of 2048, over 500 frames
    collapsed = random_tokens(20 * RATE, seed=4)
    collapsed[1] = np.array([7, 99, 1500])[np.arange(20 * RATE) % 3]
    found = first_alarm(detector, collapsed)
    assert found == 10 * RATE  # as soon as the stretch holds only collapsed frames
    assert (detector.codebook, detector.distinct) == (1, 3)


def test_the_collapse_counts_follow_the_stretch_exactly():
    """Incremental counts equal counting the last `frames` frames afresh, chunk after chunk
    (chunks of several sizes, also larger than the stretch)."""
    detector = CollapseDetector(37, 6)
    tokens = random_tokens(400, seed=5) % 50
    at = 0
    for size in [3, 10, 1, 40, 7, 100, 13] * 3:
        chunk = tokens[:, at : at + size]
        if chunk.shape[1] == 0:
            break
        detector.feed(chunk)
        at += chunk.shape[1]
        assert detector._counts is not None
        recent = tokens[:, max(0, at - 37) : at]
        for k in range(K):
            expected = np.bincount(recent[k], minlength=detector._counts.shape[1])
            assert (detector._counts[k] == expected).all(), (size, at, k)


def test_frames_with_equal_tokens_have_equal_keys():
    tokens = random_tokens(1000, seed=6)
    tokens[:, 500] = tokens[:, 10]
    keys = frame_keys(tokens)
    assert keys[500] == keys[10]
    assert len(set(keys.tolist())) == 999  # and no two different frames collide


# ---- the watchdog: a verdict per chunk, the plan, the crossfade ----------------------------


def config(**changes) -> WatchdogConfig:
    return WatchdogConfig(**changes)


def feed_silence(dog: Watchdog, start: int, seconds: float) -> list[Problem | None]:
    out = []
    for f in range(start, start + round(seconds * RATE), CHUNK):
        out.append(dog.feed(f, random_tokens(CHUNK, seed=f), np.zeros((1, CHUNK * HOP))))
    return out


def test_the_watchdog_names_the_problem_and_starts_afresh_when_the_stream_jumps():
    dog = Watchdog(config(), RATE, HOP)
    found = feed_silence(dog, 0, 5)
    assert found[-1] == Problem("silence", "silence for 5 s") and found[:-1] == [None] * 24
    dog = Watchdog(config(), RATE, HOP)
    assert feed_silence(dog, 0, 4) == [None] * 20
    assert feed_silence(dog, 150, 4) == [None] * 20  # a rewind (a prompt change): afresh
    assert feed_silence(dog, 350, 1)[-1] is not None  # 5 s since
    dog = Watchdog(config(collapse_seconds=2), RATE, HOP)
    collapsed = random_tokens(2 * RATE, seed=7)
    collapsed[0] = 5
    pcm = np.ones((1, CHUNK * HOP), np.float32)
    verdicts = [dog.feed(i * CHUNK, c, pcm) for i, c in enumerate(chunks(collapsed))]
    assert verdicts[-1] == Problem("collapse", "codebook 1 used 1 distinct token(s) over 2 s")
    dog = Watchdog(config(loop_seconds=4), RATE, HOP)
    looped = np.tile(random_tokens(RATE, seed=8), 5)  # 1 s, five times
    verdicts = [dog.feed(i * CHUNK, c, pcm) for i, c in enumerate(chunks(looped))]
    loop = next(v for v in verdicts if v is not None)
    assert loop.kind == "loop"
    assert re.fullmatch(
        r"a loop: the same 1 s of tokens repeat over \d+% of the last 4 s", loop.detail
    )


def test_the_plan_reaches_back_for_the_crossfade_but_never_before_what_was_heard():
    dog = Watchdog(config(context_seconds=1, crossfade_seconds=0.5), RATE, HOP)
    silence = Problem("silence", "silence for 5 s")
    assert dog.plan(silence, stream_frame=1000, earliest=800) == Plan(975, 50)
    assert dog.plan(silence, stream_frame=1000, earliest=990) == Plan(990, 50)
    assert dog.plan(silence, stream_frame=1000, earliest=1200) == Plan(1000, 50)
    dog.reanchored(silence, 975)
    # the same problem again within a minute: the short context did not help, none now
    assert dog.plan(silence, stream_frame=1500, earliest=0) == Plan(1475, 0)
    assert dog.plan(Problem("loop", "..."), stream_frame=1500, earliest=0) == Plan(1475, 50)
    assert dog.plan(silence, stream_frame=975 + 61 * RATE, earliest=0).context_frames == 50
    none = Watchdog(config(context_seconds=0, crossfade_seconds=0), RATE, HOP)
    assert none.plan(silence, stream_frame=1000, earliest=0) == Plan(1000, 0)


def test_the_crossfade_takes_the_old_audio_out_and_the_new_in_at_equal_power():
    tail = AudioTail(keep=3 * HOP)
    for f in range(0, 10):
        tail.add(f * HOP, np.full((1, HOP), float(f), np.float32))
    old = tail.since(8 * HOP)
    assert old is not None and (old[0] == np.repeat([8.0, 9.0], HOP)).all()
    assert tail.since(2 * HOP) is None  # no longer kept
    tail.add(9 * HOP, np.full((1, HOP), 42.0, np.float32))  # a rewind replaces what follows
    assert (tail.since(9 * HOP)[0] == 42.0).all()

    fade = Crossfade(np.ones((1, 1000), np.float32), start=5000)
    first = fade.apply(5000, np.zeros((1, 600), np.float32))  # new audio silent: old fades out
    second = fade.apply(5600, np.full((1, 600), 2.0, np.float32))
    assert fade.done
    t = (np.arange(1000) + 0.5) / 1000
    assert np.allclose(first[0], np.cos(t[:600] * np.pi / 2), atol=1e-6)
    assert np.allclose(
        second[0, :400], 2 * np.sin(t[600:] * np.pi / 2) + np.cos(t[600:] * np.pi / 2), atol=1e-6
    )
    assert (second[0, 400:] == 2.0).all()  # the new audio alone after the fade
    gains = np.sin(t * np.pi / 2) ** 2 + np.cos(t * np.pi / 2) ** 2
    assert np.allclose(gains, 1.0)  # equal power: no dip in loudness for unrelated audio


def test_the_detectors_are_cheap():
    """A minute of stereo-sized frames (8 codebooks) and audio through the watchdog."""
    dog = Watchdog(config(), RATE, HOP)
    tokens = random_tokens(60 * RATE, seed=9, k=8)
    pcm = np.random.default_rng(9).normal(0, 0.1, (2, CHUNK * HOP)).astype(np.float32)
    began = time.perf_counter()
    for i, chunk in enumerate(chunks(tokens)):
        assert dog.feed(i * CHUNK, chunk, pcm) is None
    spent = time.perf_counter() - began
    print(f"\nthe watchdog: {spent * 1000:.0f} ms for 60 s of 8-codebook stereo audio")
    assert spent < 1.5  # about 1% of one core at most, even on a loaded machine


# ---- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("silence_db", 0, "watchdog.silence_db: must be in [-120, -20] dBFS, got 0.0"),
        ("silence_seconds", 0.1, "watchdog.silence_seconds: must be in [0.5, 300] seconds"),
        ("loop_seconds", 1, "watchdog.loop_seconds: must be in [2, 300] seconds, got 1.0"),
        ("loop_share", 1.5, "watchdog.loop_share: must be in [0.05, 1], got 1.5"),
        ("collapse_seconds", 400, "watchdog.collapse_seconds: must be in [0.5, 300] seconds"),
        ("collapse_tokens", 1, "watchdog.collapse_tokens: must be in [2, 256], got 1"),
        ("collapse_tokens", 6.5, "watchdog.collapse_tokens: must be an integer, got 6.5"),
        ("context_seconds", -1, "watchdog.context_seconds: must be in [0, 10] seconds"),
        ("crossfade_seconds", 9, "watchdog.crossfade_seconds: must be in [0, 5] seconds"),
        ("enabled", "yes", "watchdog.enabled: must be true or false, got 'yes'"),
        ("loud", 1, "watchdog.loud: unknown key"),
    ],
)
def test_a_bad_watchdog_setting_stops_start_up_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as err:
        parse_config({"watchdog": {key: value}})
    assert str(err.value).startswith(words), str(err.value)


def test_the_context_of_a_re_anchor_fits_in_a_window_restarts_context():
    with pytest.raises(ConfigError, match=r"watchdog.context_seconds: must be at most "):
        parse_config({"generation": {"context": 100}, "watchdog": {"context_seconds": 3}})
    assert parse_config({}).watchdog == WatchdogConfig()


# ---- the generator re-anchors a fake stream ----------------------------------------------


async def test_silence_is_re_anchored_ahead_of_the_clock_with_a_crossfade(run, caplog):
    caplog.set_level(logging.INFO, "radio")
    faults = FaultInjector()
    dog = config(silence_seconds=1, crossfade_seconds=0.2, context_seconds=1)
    gen, sink = await run(FakeModel(), ("a",), faults=faults, buffer_ahead=4.0, watchdog=dog)
    await sink.until(lambda: len(sink.pcm("a")) >= 3)  # frames 0..29 at least
    faults.silence("a", 10 * RATE * HOP)  # 10 s: the watchdog must end it after 1 s
    await sink.until(lambda: sink.of("reanchored"))
    (reanchor,) = sink.of("reanchored")
    stream = gen.model.streams[0]
    assert reanchor.problem == Problem("silence", "silence for 1 s")
    assert stream.restarts == [(reanchor.frame, 50)]  # 1 s of context
    silent_from = next(
        s for s, pcm in zip(sink.pcm("a"), sink.audio["a"], strict=True) if not pcm.any()
    )
    assert reanchor.frame == silent_from + RATE - 10  # 1 s of silence, 0.2 s back for the fade
    i = sink.calls.index(("reanchored", "a", reanchor))
    await sink.until(lambda: len(sink.calls) >= i + 3)
    assert sink.calls[i + 1] == ("pcm", "a", reanchor.frame)  # the cut, then the new audio
    k = sum(1 for c in sink.calls[:i] if c[0] == "pcm")  # the chunks made before the cut
    new, after = sink.audio["a"][k][0], sink.audio["a"][k + 1][0]
    ramp = np.sin((np.arange(10 * HOP) + 0.5) / (10 * HOP) * np.pi / 2)  # old audio: silent
    assert np.allclose(new, frames(reanchor.frame, reanchor.frame + 10) * ramp, rtol=1e-5)
    assert (after == frames(reanchor.frame + 10, reanchor.frame + 20)).all()  # silence ended
    assert reanchor.context_seconds == 1.0
    assert (
        f"station a: music watchdog: silence for 1 s; re-anchored at {reanchor.frame / RATE:.1f} s "
        "from 1 s of context"
    ) in [r.getMessage() for r in caplog.records]
    # the same problem again within a minute: no context at all
    faults.silence("a", 10 * RATE * HOP)
    await sink.until(lambda: len(sink.of("reanchored")) == 2)
    assert stream.restarts[-1][1] == 0 and sink.of("reanchored")[1].context_seconds == 0
    assert any(
        r.getMessage().endswith("from no context (the prompt alone)") for r in caplog.records
    )


async def test_a_disabled_watchdog_never_re_anchors(run):
    faults = FaultInjector()
    dog = config(enabled=False, silence_seconds=1)
    gen, sink = await run(FakeModel(), ("a",), faults=faults, buffer_ahead=4.0, watchdog=dog)
    faults.silence("a", 3 * RATE * HOP)
    await sink.until(lambda: len(sink.pcm("a")) >= 18)
    await asyncio.sleep(0.1)
    assert sink.of("reanchored") == [] and gen.watchdog is None


# ---- the tiny models: no false trigger over a long normal render ---------------------------


@pytest.mark.parametrize("which", ["mono", "stereo"])
def test_no_false_trigger_over_a_long_render_of_the_tiny_models(
    which, tiny_model_dir, tiny_stereo_dir
):
    """65 s of the tiny models (random weights: noise, as every test radio plays) through the
    watchdog with its default settings: nothing found; and how far from each threshold."""
    from engine import LoadOptions, MusicModel, SamplingOptions
    from engine.clip import one_thread

    path = tiny_model_dir if which == "mono" else tiny_stereo_dir
    model = MusicModel.load(LoadOptions(model=path, device="cpu", dtype="float32"))
    stream = model.open_stream("calm lofi beat with piano", SamplingOptions(seed=3))
    cfg = WatchdogConfig()
    dog = Watchdog(cfg, model.frame_rate, model.hop)
    quietest, most_repeated, fewest = 0.0, 0.0, 2048
    for start in range(0, 65 * RATE, CHUNK):
        # one thread: two beside a busy neighbour wait on each other (engine/threads.py)
        with one_thread():
            pcm = stream.read(CHUNK)
        tokens = stream.token_frames(start, start + CHUNK)
        assert dog.feed(start, tokens, pcm) is None, f"false trigger at {start / RATE:.1f} s"
        frame_power = np.square(pcm, dtype=np.float64).reshape(pcm.shape[0], CHUNK, -1)
        quietest = min(quietest, 10 * np.log10(frame_power.mean(axis=(0, 2)).min() + 1e-30))
        most_repeated = max(most_repeated, dog.loop.repeated)
        if dog.collapse._filled == dog.collapse.frames:
            fewest = min(fewest, dog.collapse.distinct)
    print(
        f"\n{which}: quietest frame {quietest:.0f} dBFS (silence below {cfg.silence_db}), "
        f"repeated blocks at most {most_repeated:.0%} (loop at {cfg.loop_share:.0%}), "
        f"fewest distinct tokens in a codebook {fewest} (collapse below {cfg.collapse_tokens})"
    )
    assert quietest > cfg.silence_db + 10
    assert most_repeated < 0.1 and fewest > 10 * cfg.collapse_tokens


# ---- live: each problem forced on a running radio ----------------------------------------


def metric(base: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


LIVE = {  # the problem: (its setting, seconds, how to force it)
    "silence": ("silence_seconds", 1.0, lambda f: f.silence("main", 30 * 32000)),
    "loop": ("loop_seconds", 4.0, lambda f: f.loop_tokens("main", 25)),
    "collapse": ("collapse_seconds", 2.0, lambda f: f.collapse_codebook("main", 2, 2)),
}


@pytest.mark.parametrize("problem", list(LIVE))
def test_a_forced_problem_is_found_in_time_and_the_station_re_anchored(radio_factory, problem):
    key, seconds, force = LIVE[problem]
    faults = FaultInjector()
    radio = radio_factory(faults=faults, watchdog={key: seconds})
    base, st = radio.base_url, radio.radio.stations["main"]
    time.sleep(0.5)
    assert st.health.reanchors == {}
    armed = time.monotonic()
    force(faults)
    wait_until(lambda: st.health.reanchors, seconds + 5, f"a re-anchor for the {problem}")
    took = time.monotonic() - armed
    # the generator makes audio at real-time pace once its buffer is full: the problem is
    # found once the configured stretch of it has been made, plus a chunk or two
    assert took < seconds + 1.5, f"found after {took:.1f} s ({key} = {seconds})"
    assert st.health.reanchors == {problem: 1}
    health = call("GET", f"{base}/api/stations/main")[2]["health"]
    assert health["reanchors"] == 1
    last = health["last_reanchor"]
    assert last["problem"] == problem and last["context_seconds"] == 1.0, last
    assert last["stream_seconds"] > 0 and re.match(r"\d{4}-\d\d-\d\dT", last["at"]), last
    labels = f'{{problem="{problem}",station="main"}}'
    assert metric(base, "radio_watchdog_reanchors_total", labels) == 1.0
    time.sleep(2.0)  # the fault ended with the re-anchor: the music is fine again
    assert st.health.reanchors == {problem: 1} and call("GET", f"{base}/healthz")[0] == 200
