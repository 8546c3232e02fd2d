"""Seeding from a clip: uploaded audio files -> MusicGen tokens, and the continuation from them.

Real files written with PyAV (WAV, MP3, Ogg/Opus, FLAC; 44.1 kHz stereo and 16 kHz mono, so
resampling and downmixing run) on the tiny models: the tokens equal transformers' own encoding
of the same audio, and the stream continued from them equals the reference `generate` given
those tokens or that audio, token for token, mono and stereo. Bad uploads end in `ClipError`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LoadOptions, MusicModel, SamplingOptions
from engine.clip import Clip, ClipError, ClipLimits, _libgomp, decode_clip
from tests.audio_files import encode_file, flac_bomb, tones, wav_bytes
from tests.engine.reference import reference_tokens, transformers_model

PROMPT = "slow rainy day jazz"
RATE, HOP = 32000, 640
SECONDS = 2.0  # every test file: 100 frames
FILES = {  # name: (container, codec, rate, channels)
    "wav-44k-stereo": ("wav", "pcm_s16le", 44100, 2),
    "mp3-44k-stereo": ("mp3", "libmp3lame", 44100, 2),
    "opus-16k-mono": ("ogg", "libopus", 16000, 1),
    "flac-16k-mono": ("flac", "flac", 16000, 1),
}


def make_file(name: str, seconds: float = SECONDS) -> bytes:
    container, codec, rate, channels = FILES[name]
    return encode_file(tones(rate, channels, seconds), rate, container, codec)


def decode(data: bytes, channels: int, **limits) -> np.ndarray:
    return decode_clip(
        data, sample_rate=RATE, channels=channels, hop=HOP, limits=ClipLimits(**limits)
    ).pcm


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def stereo(tiny_stereo_dir):
    return _load(tiny_stereo_dir)


def _load(path):
    """(our MusicModel, transformers' model, processor) of the same float32 weights."""
    ours = MusicModel.load(LoadOptions(model=path, device="cpu", dtype="float32"))
    return (ours, *transformers_model(path))


# ---- decoding: resampling and channels ---------------------------------------------------------


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("channels", [1, 2])
def test_decoded_audio_is_the_clip_at_the_model_rate(name, channels):
    """Every format decodes to the tones it holds, resampled to 32 kHz: a mono model hears the
    mean of a stereo file's channels, a stereo model both sides (a mono file on each)."""
    pcm = decode(make_file(name), channels)
    assert pcm.dtype == np.float32 and pcm.shape == (channels, SECONDS * RATE)
    source_channels = FILES[name][3]
    expected = tones(RATE, source_channels, SECONDS)  # the same signal, computed at 32 kHz
    if channels == 1:
        expected = expected.mean(axis=0, keepdims=True)
    elif source_channels == 1:
        expected = np.repeat(expected, 2, axis=0)
        assert np.array_equal(pcm[0], pcm[1])
    middle = slice(HOP * 5, -HOP * 5)  # away from the codecs' and the resampler's edges
    error = pcm[:, middle] - expected[:, middle]
    snr = 10 * np.log10((expected[:, middle] ** 2).sum() / (error**2).sum())
    lossless = FILES[name][0] in ("wav", "flac")
    assert snr > (40 if lossless else 15), f"{name}: {snr:.1f} dB"


def test_a_mono_clip_on_a_stereo_model_gives_equal_left_and_right_codes(stereo):
    ours, _, _ = stereo
    clip = ours.encode_clip(make_file("flac-16k-mono"))
    assert clip.tokens.shape == (8, 100)
    assert torch.equal(clip.tokens[0::2], clip.tokens[1::2])


def test_length_is_trimmed_to_whole_frames_and_slack_to_the_limit():
    pcm = decode(make_file("wav-44k-stereo", seconds=1.2345), 1)
    assert pcm.shape == (1, 61 * HOP)  # 1.2345 s = 61.7 frames: the partial frame goes
    pcm = decode(make_file("wav-44k-stereo", seconds=2.3), 1, max_seconds=2.0)
    assert pcm.shape == (1, 100 * HOP)  # up to 0.5 s over the limit is trimmed, not refused


# ---- tokens: transformers' own encoding, and the continuation ------------------------------------


@pytest.mark.parametrize(
    "which, name",
    [("mono", "wav-44k-stereo"), ("mono", "opus-16k-mono"), ("stereo", "mp3-44k-stereo")],
)
def test_tokens_equal_transformers_encoding_of_the_same_audio(which, name, request):
    """Exactly what `generate` makes of an audio prompt (`input_values`): EnCodec's `encode`
    of each channel, stereo codebooks interleaved L/R."""
    ours, hf, _ = request.getfixturevalue(which)
    clip = ours.encode_clip(make_file(name))
    assert isinstance(clip, Clip) and clip.frames == 100 and clip.seconds == SECONDS
    audio = torch.from_numpy(clip.audio.pcm)[None]  # [1, C, N]
    with torch.inference_mode():
        ref = hf._prepare_audio_encoder_kwargs_for_generation(audio, {})["decoder_input_ids"]
        sides = [
            hf.audio_encoder.encode(x).audio_codes[0, 0] for x in (audio[:, :1], audio[:, -1:])
        ]
    assert ref.shape == clip.tokens.shape
    assert torch.equal(clip.tokens, ref)
    left, right = clip.tokens[0 :: ours.channels], clip.tokens[ours.channels - 1 :: ours.channels]
    assert torch.equal(left, sides[0]) and torch.equal(right, sides[1])


def _comparable_frames(steps: int, hf) -> int:
    """Frames of a reference run of `steps` steps untouched by its end-of-sequence padding (see
    tests/engine/test_equivalence.py)."""
    config = hf.decoder.config
    channel_codebooks = config.num_codebooks // config.audio_channels
    return steps + 2 - channel_codebooks - (channel_codebooks - 1)


@pytest.mark.parametrize("which, name", [("mono", "wav-44k-stereo"), ("stereo", "mp3-44k-stereo")])
@torch.inference_mode()
def test_continuation_from_a_clip_equals_reference_generate(which, name, request):
    """`open_stream(prompt_frames=clip.tokens)` under greedy decoding equals transformers'
    `generate` given the same tokens as `decoder_input_ids`, and given the audio itself."""
    ours, hf, processor = request.getfixturevalue(which)
    clip = ours.encode_clip(make_file(name))
    steps = 100
    by_tokens = reference_tokens(hf, processor, PROMPT, steps, 3.0, prompt_frames=clip.tokens)
    by_audio = reference_tokens(hf, processor, PROMPT, steps, 3.0, audio=clip.audio.pcm)
    assert torch.equal(by_tokens, by_audio)
    assert torch.equal(by_tokens[:, : clip.frames], clip.tokens)

    sampling = SamplingOptions(greedy=True, guidance_scale=3.0)
    stream = ours.open_stream(PROMPT, sampling, prompt_frames=clip.tokens)
    frames = clip.frames + _comparable_frames(steps, hf) - 1
    stream.tokens.generate_until(frames)
    tokens = stream.tokens.history()[0][:, :frames]
    mismatch = (tokens != by_tokens[:, :frames]).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"
    assert frames - clip.frames >= 90


@pytest.mark.parametrize("batched", [False, True])
@torch.inference_mode()
def test_a_running_stream_seeded_from_a_clip_continues_like_reference_generate(mono, batched):
    """`AudioStream.seed(clip.tokens, prompt, from_frame)` in the middle of a stream (alone, and
    as one station of a batch): the frames heard before stay; from `from_frame` on the stream
    writes what `generate` writes given the clip's tokens as `decoder_input_ids` (greedy);
    rewinding before the seed is refused."""
    ours, hf, processor = mono
    clip = ours.encode_clip(make_file("wav-44k-stereo"))
    steps = 60
    reference = reference_tokens(hf, processor, PROMPT, steps, 3.0, prompt_frames=clip.tokens)
    sampling = SamplingOptions(greedy=True, guidance_scale=3.0)
    if batched:
        stream, _ = ours.open_streams(["fast drum and bass", "harp"], [sampling] * 2)
    else:
        stream = ours.open_stream("fast drum and bass", sampling)
    stream.read(40)
    before = stream.tokens.history()[0][:, :30].clone()
    assert stream.seed(clip.tokens, PROMPT, from_frame=30) == 30  # a rewind of 10 frames
    assert stream.frame == 30 and stream.prompt == PROMPT
    made = _comparable_frames(steps, hf) - 1
    stream.read(made)
    tokens, offset = stream.tokens.history()
    assert offset == 0 and torch.equal(tokens[:, :30], before)
    continued = tokens[:, 30 : 30 + made]
    expected = reference[:, clip.frames : clip.frames + made]
    mismatch = (continued != expected).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"
    with pytest.raises(ValueError, match="seeded at frame 30"):
        stream.set_prompt("anything", from_frame=29)
    with pytest.raises(ValueError, match=r"seed frames must be \[4, T >= 1\]"):
        stream.seed(clip.tokens[:2], None)


_ONE_THREAD_CHECK = """
import json, os, sys, threading
import torch
from engine import LoadOptions, MusicModel
from engine.clip import one_thread
from tests.engine.test_clip import make_file

ours = MusicModel.load(LoadOptions(model=sys.argv[1], device="cpu", dtype="float32"))
data = make_file("wav-44k-stereo")
expected = ours.encode_clip(data).tokens  # the main thread's own team exists from here on
seen = {"main": torch.get_num_threads()}

def tasks():
    return len(os.listdir("/proc/self/task"))

def work():
    seen["before"] = torch.get_num_threads()
    with one_thread():
        seen["inside"] = torch.get_num_threads()
    seen["after"] = torch.get_num_threads()
    tokens = ours.encode_clip(data, single_thread=True).tokens
    seen["same_tokens"] = bool(torch.equal(tokens, expected))
    seen["tasks"] = tasks()  # an OpenMP team's workers would live as long as this thread

seen["started_with"] = tasks()
thread = threading.Thread(target=work)
thread.start()
thread.join()
seen["main_after"] = torch.get_num_threads()
print(json.dumps(seen))
"""


def test_a_single_thread_encode_makes_no_openmp_team_and_leaves_others_alone(tiny_model_dir):
    """`encode_clip(single_thread=True)` in a worker thread: that thread runs torch on one
    thread (no OpenMP workers created), the same tokens come out, and the count is restored.

    In a process of its own, on two threads whatever this worker's share of the cores: the
    threads are counted process-wide, a test worker's process holds other tests' threads, which
    come and go on their own, and on one thread there would be no team to tell apart."""
    if _libgomp() is None:
        pytest.skip("torch does not run on libgomp here")
    done = subprocess.run(
        [sys.executable, "-c", _ONE_THREAD_CHECK, tiny_model_dir],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["main"] == 2
    assert seen["inside"] == 1 and seen["before"] == seen["after"] == seen["main"]
    assert seen["tasks"] == seen["started_with"] + 1
    assert seen["same_tokens"]
    assert seen["main_after"] == seen["main"]


# ---- limits: every bad upload is a ClipError naming the problem --------------------------------

_MP3_44K = encode_file(tones(44100, 1, 1.0), 44100, "mp3", "libmp3lame")
_MP3_48K = encode_file(tones(48000, 1, 1.0), 48000, "mp3", "libmp3lame")
_PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nfile:///etc/hostname\n"


@pytest.mark.parametrize(
    "case, data, limits, code, words",
    [
        ("no bytes", b"", {}, "empty", "empty"),
        ("text", b"hello, this is not music\n" * 40, {}, "not_audio", "not an audio file"),
        ("png", b"\x89PNG\r\n\x1a\n" + bytes(200), {}, "not_audio", "not an audio file"),
        ("hls playlist", _PLAYLIST, {}, "not_audio", "not an audio file"),
        ("header only", wav_bytes(np.zeros((1, 0)), 16000), {}, "empty", "no audio samples"),
        ("5.1", wav_bytes(tones(16000, 1, 1.5).repeat(6, 0), 16000), {}, "channels", "6 channels"),
        ("nan", wav_bytes(np.full((1, 32000), np.nan), 16000, float32=True), {}, "not_audio",
         "not finite"),
        ("2 kHz", wav_bytes(tones(2000, 1, 2.0), 2000), {}, "sample_rate", "2000 Hz"),
        ("rate change", _MP3_44K + _MP3_48K, {}, "sample_rate", "changes its sample rate"),
        ("1 sample", wav_bytes(np.full((1, 1), 0.5), 16000), {}, "empty", "no audio samples"),
        ("silence", wav_bytes(np.zeros((2, 44100)), 44100), {}, "silent", "digital silence"),
        ("-70 dBFS", wav_bytes(tones(16000, 1, 2.0, amplitude=3e-4), 16000), {}, "silent",
         "below -60 dBFS"),
        ("0.5 s", wav_bytes(tones(16000, 1, 0.5), 16000), {}, "too_short", "shorter than"),
        ("3 s > 2 s", wav_bytes(tones(16000, 1, 3.0), 16000), {"max_seconds": 2}, "too_long",
         "longer than the limit of 2 s"),
        ("big", wav_bytes(tones(16000, 1, 2.0), 16000), {"max_bytes": 1000}, "too_big",
         "more than the limit of 1000"),
        ("slow", wav_bytes(tones(16000, 1, 2.0), 16000), {"max_decode_seconds": 1e-9},
         "too_slow", "took longer"),
    ],
)  # fmt: skip
def test_bad_uploads_are_refused_with_a_reason(case, data, limits, code, words):
    with pytest.raises(ClipError) as refused:
        decode(data, 1, **limits)
    assert refused.value.code == code, str(refused.value)
    assert words in str(refused.value)


def test_a_decompression_bomb_stops_at_the_limit():
    """6 KB of FLAC that decodes to an hour: refused after 30 s of audio, never holding more
    (decoded in full at 32 kHz it would take 460 MB)."""
    bomb = flac_bomb(3600)
    assert len(bomb) < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(ClipError, match="longer than the limit of 30 s") as refused:
            decode(bomb, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.code == "too_long"
    assert peak < 10e6, f"{peak / 1e6:.0f} MB held while decoding"
    # The same kind of file, short, is accepted: 2 blocks of 65535 samples at 8 kHz, 16.4 s.
    assert decode(flac_bomb(10), 1).shape == (1, 2 * 65535 * RATE // 8000 // HOP * HOP)


def test_hostile_bytes_end_in_clip_error_or_a_clip(mono):
    """Hundreds of truncated, bit-flipped, spliced and random inputs through the whole path:
    each gives a ClipError or a valid clip, never another exception."""
    ours = mono[0]
    seeds = [make_file(name, seconds=1.0) for name in FILES] + [flac_bomb(40)]
    limits = ClipLimits(min_seconds=0.1)
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = _mutate(rng, rng.choice(seeds), seeds)
        try:
            clip = ours.encode_clip(data, limits)
        except ClipError as e:
            outcomes[e.code] = outcomes.get(e.code, 0) + 1
            continue
        assert clip.tokens.shape == (4, clip.frames) and clip.frames >= 5
        assert int(clip.tokens.min()) >= 0 and int(clip.tokens.max()) < 2048
        outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok", 0) > 20 and outcomes.get("not_audio", 0) > 20, outcomes


def _mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    kind = rng.choice(["truncate", "flip", "random", "splice", "garbage after header"])
    if kind == "truncate":
        return seed[: rng.randrange(len(seed))]
    if kind == "flip":
        data = bytearray(seed)
        for _ in range(rng.choice([1, 5, 50])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "random":
        return rng.randbytes(rng.randrange(1, 5000))
    if kind == "splice":
        return seed[: rng.randrange(len(seed))] + rng.choice(seeds)[rng.randrange(100) :]
    return seed[: rng.randrange(64)] + rng.randbytes(rng.randrange(2000))


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("max_seconds", 31.0, "max_seconds: must be in (0, 30]"),
        ("min_seconds", 0.01, "min_seconds"),
        ("max_bytes", 0, "max_bytes"),
        ("max_decode_seconds", 0.0, "max_decode_seconds"),
        ("silence_dbfs", 3.0, "silence_dbfs"),
    ],
)
def test_limits_name_the_bad_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        ClipLimits(**{field: value}).validate()
