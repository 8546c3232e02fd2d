"""Live HLS: the playlist rules of RFC 8216 on successive playlists (constant target duration
bounding every EXTINF, growing media sequence, >= 3 target durations listed, program date
time, discontinuity and a larger sequence after a restart), segments that decode with PyAV,
ffprobe and ffmpeg into the pushed audio without gaps, and the folder mode read live by ffmpeg."""

from __future__ import annotations

import io
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta

import av
import numpy as np
import pytest

from radio.hls import HlsSegmenter
from tests.helpers import require_tool

RATE = 32000
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _sine(seconds: float, freq: float = 440.0, start: int = 0) -> np.ndarray:
    t = (start + np.arange(int(seconds * RATE))) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None]  # [1, N]


class Feeder:
    """Pushes audio with the wallclock a real-time clock would give each chunk."""

    def __init__(self, hls: HlsSegmenter, start: datetime = T0) -> None:
        self.hls, self.start, self.pushed = hls, start, 0

    def push(self, pcm: np.ndarray, chunk: int = 3200) -> None:
        for i in range(0, pcm.shape[1], chunk):
            part = pcm[:, i : i + chunk]
            self.hls.push(part, self.start + timedelta(seconds=self.pushed / RATE))
            self.pushed += part.shape[1]


def parse(text: str) -> dict:
    """A media playlist -> header values and a list of segment dicts."""
    lines = text.strip().split("\n")
    assert lines[0] == "#EXTM3U"
    head, segs, cur = {}, [], {}
    for line in lines[1:]:
        if line.startswith("#EXTINF:"):
            cur["duration"] = float(line[8:].rstrip(","))
        elif line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            cur["pdt"] = datetime.fromisoformat(line.split(":", 1)[1].replace("Z", "+00:00"))
        elif line == "#EXT-X-DISCONTINUITY":
            cur["discontinuity"] = True
        elif line.startswith("#EXT-X-"):
            key, _, value = line[7:].partition(":")
            head[key] = value
        elif line and not line.startswith("#"):
            segs.append({"name": line, "discontinuity": False, **cur})
            cur = {}
    return {
        "target": int(head["TARGETDURATION"]),
        "sequence": int(head["MEDIA-SEQUENCE"]),
        "disc_sequence": int(head["DISCONTINUITY-SEQUENCE"]),
        "segments": segs,
    }


def _decode_ts(data: bytes) -> tuple[np.ndarray, int]:
    """(pcm [C, N], pts of the first frame in 1/rate) of one MPEG-TS segment."""
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(audio=0))
    first = frames[0]
    return np.concatenate([f.to_ndarray() for f in frames], axis=1), round(
        first.pts * first.time_base * first.sample_rate
    )


def test_playlist_rules_on_successive_reloads():
    hls = HlsSegmenter(RATE, 1, segment_seconds=2.0, playlist_segments=5, grace_segments=3)
    feed = Feeder(hls)
    assert parse(hls.playlist())["segments"] == []
    seen, last_seq = {}, -1
    for second in range(30):
        feed.push(_sine(1.0, start=second * RATE))
        pl = parse(hls.playlist())
        assert pl["target"] == hls.target_duration == 2
        assert pl["sequence"] >= last_seq
        last_seq = pl["sequence"]
        for k, seg in enumerate(pl["segments"]):
            assert seg["duration"] <= pl["target"]
            assert seg["name"] == f"seg{pl['sequence'] + k}.ts"
            assert hls.segment(seg["name"]) is not None
            seen.setdefault(seg["name"], seg)
            assert seen[seg["name"]] == seg  # a listed segment never changes
        if feed.pushed > 12 * RATE:  # warmed up
            assert sum(s["duration"] for s in pl["segments"]) >= 3 * pl["target"]
        # Program date time: the wallclock of the segment's first sample (priming included).
        for seg in pl["segments"]:
            n = int(seg["name"][3:-3])
            expect = T0 + timedelta(seconds=(n * hls.frames_per_segment - 1) * 1024 / RATE)
            assert abs((seg["pdt"] - expect).total_seconds()) < 0.002
    assert last_seq > 5 and hls.next_sequence == last_seq + 5
    # Grace: segments that left the list are still served, then forgotten.
    first_listed = parse(hls.playlist())["sequence"]
    for n in range(first_listed - 3, first_listed):
        assert hls.segment(f"seg{n}.ts") is not None
    assert hls.segment(f"seg{first_listed - 4}.ts") is None
    assert hls.segment("nope.ts") is None


def test_restart_continues_the_sequence_with_a_discontinuity():
    old = HlsSegmenter(RATE, 1, playlist_segments=4, grace_segments=1)
    Feeder(old).push(_sine(20.0))
    before = parse(old.playlist())
    kept_seq, kept_disc = old.next_sequence, old.discontinuity_sequence
    new = HlsSegmenter(
        RATE,
        1,
        playlist_segments=4,
        grace_segments=1,
        start_sequence=kept_seq,
        start_discontinuity_sequence=kept_disc,
    )
    # start_sequence > 0 marks the first segment by itself; marking it again changes nothing.
    new.mark_discontinuity()
    feed = Feeder(new, start=T0 + timedelta(seconds=25))
    feed.push(_sine(4.1))
    after = parse(new.playlist())
    assert after["sequence"] > before["sequence"]
    assert after["segments"][0]["name"] == f"seg{kept_seq}.ts"
    assert after["segments"][0]["discontinuity"]
    assert not any(s["discontinuity"] for s in after["segments"][1:])
    assert after["disc_sequence"] == 0
    feed.push(_sine(10.0))  # the discontinuity leaves the list: its number moves to the header
    later = parse(new.playlist())
    assert later["disc_sequence"] == 1 and not any(s["discontinuity"] for s in later["segments"])
    assert new.discontinuity_sequence == 1
    auto = HlsSegmenter(RATE, 1, start_sequence=kept_seq)  # not marked by hand
    Feeder(auto).push(_sine(2.5))
    assert parse(auto.playlist())["segments"][0]["discontinuity"]
    fresh = HlsSegmenter(RATE, 1)
    Feeder(fresh).push(_sine(2.5))
    assert not parse(fresh.playlist())["segments"][0]["discontinuity"]
    fresh.mark_discontinuity()  # mid-stream: the next segment to start gets it
    Feeder(fresh).push(_sine(4.0))
    flags = [s["discontinuity"] for s in parse(fresh.playlist())["segments"]]
    assert flags.count(True) == 1 and not flags[0]


def test_segments_decode_into_the_pushed_audio_without_gaps():
    ffprobe = require_tool("ffprobe")
    hls = HlsSegmenter(RATE, 1, playlist_segments=20, output_sample_rate=48000, output_channels=2)
    rng = np.random.default_rng(0)
    audio = _sine(13.0, freq=1000.0)
    feed, i = Feeder(hls), 0
    while i < audio.shape[1]:
        n = int(rng.integers(1, 5000))
        feed.push(audio[:, i : i + n], chunk=n)
        i += n
    hls.flush()
    segs = hls.segments
    assert len(segs) == 7  # 13 s in 1.984 s segments: 6 whole and the flushed rest
    decoded, next_pts = [], 0
    for seg in segs:
        pcm, pts = _decode_ts(seg.data)
        assert pcm.shape[0] == 2
        assert pts == next_pts  # each segment starts where the last ended
        next_pts += pcm.shape[1]
        decoded.append(pcm)
        assert 0 <= pcm.shape[1] / 48000 - seg.duration < 1024 / 48000  # last: padded
    # A player runs one decoder across segments (AAC frames overlap): so does this check.
    pcm, _ = _decode_ts(b"".join(seg.data for seg in segs))
    assert pcm.shape[1] == sum(d.shape[1] for d in decoded)
    pushed = 13.0 * 48000
    assert 0 <= pcm.shape[1] - pushed <= 2 * 1024  # priming + the last frame's padding
    spec = np.abs(np.fft.rfft(pcm[0, 48000 : 5 * 48000]))
    assert abs(np.argmax(spec) * 48000 / (4 * 48000) - 1000.0) < 1.0
    # No seam at the segment joins: the decoded sine is as clean there as anywhere.
    join = round(segs[2].duration * 48000) * 3
    window = pcm[0, join - 2000 : join + 2000]
    t = np.arange(len(window)) / 48000
    fit = np.linalg.lstsq(
        np.stack([np.sin(2e3 * np.pi * t), np.cos(2e3 * np.pi * t)], 1), window, rcond=None
    )
    residual = window - np.stack([np.sin(2e3 * np.pi * t), np.cos(2e3 * np.pi * t)], 1) @ fit[0]
    assert np.sqrt(np.mean(residual**2)) < 0.002  # ~1e-4 here; a seam gives ~0.07
    run = subprocess.run(
        [ffprobe, "-v", "error", "-show_entries", "stream=codec_name,sample_rate,channels",
         "-show_entries", "format=format_name", "-of", "default=nw=1", "-"],
        input=segs[3].data, capture_output=True, timeout=20,
    )  # fmt: skip
    assert run.returncode == 0 and run.stderr == b"", run.stderr
    info = dict(line.split("=", 1) for line in run.stdout.decode().split())
    assert info == {
        "codec_name": "aac",
        "sample_rate": "48000",
        "channels": "2",
        "format_name": "mpegts",
    }


def test_folder_is_read_live_by_ffmpeg_and_old_files_go(tmp_path):
    ffmpeg = require_tool("ffmpeg")
    out = tmp_path / "hls"
    hls = HlsSegmenter(RATE, 1, out_dir=out, playlist_segments=4, grace_segments=2)
    assert parse((out / "live.m3u8").read_text())["segments"] == []
    feed = Feeder(hls)
    feed.push(_sine(8.0))  # 4 segments listed
    wanted = 10.0  # seconds ffmpeg must decode: more than was listed when it started
    proc = subprocess.Popen(
        [ffmpeg, "-v", "error", "-live_start_index", "0", "-i", str(out / "live.m3u8"),
         "-t", str(wanted), "-f", "f32le", "-ac", "1", "-y", str(tmp_path / "out.f32")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            feed.push(_sine(0.5, start=feed.pushed))  # faster than real time: ffmpeg polls
            time.sleep(0.25)
        _, stderr = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and stderr == b"", stderr.decode()
    mono = np.fromfile(tmp_path / "out.f32", np.float32)
    assert abs(len(mono) / RATE - wanted) < 0.05
    # Old files go after the grace period; the folder matches the playlist.
    feed.push(_sine(10.0, start=feed.pushed))
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith(".") for n in names)  # no temp file left behind
    listed = [s["name"] for s in parse((out / "live.m3u8").read_text())["segments"]]
    held = {s.name for s in hls.segments}
    assert set(names) == held | {"live.m3u8"} and set(listed) <= held
    assert len(held) == 4 + 2 and "seg0.ts" not in names
    assert (out / listed[-1]).read_bytes() == hls.segment(listed[-1])
    # A restart into the same folder keeps the recent files and drops the ancient ones.
    stale = out / "seg0.ts"
    stale.write_bytes(b"x")
    before = (out / "live.m3u8").read_text()
    again = HlsSegmenter(
        RATE,
        1,
        out_dir=out,
        playlist_segments=4,
        grace_segments=2,
        start_sequence=hls.next_sequence,
    )
    assert not stale.exists() and (out / listed[-1]).exists()
    assert (out / "live.m3u8").read_text() == before  # stays up until the first new segment
    Feeder(again).push(_sine(3.0))
    assert parse((out / "live.m3u8").read_text())["segments"][0]["discontinuity"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="playlist_segments"):
        HlsSegmenter(RATE, 1, segment_seconds=2.0, playlist_segments=2)
    with pytest.raises(ValueError, match="segment_seconds"):
        HlsSegmenter(RATE, 1, segment_seconds=0.01)
    with pytest.raises(ValueError, match="start_sequence"):
        HlsSegmenter(RATE, 1, start_sequence=-1)


def test_target_duration_bounds_every_extinf_for_odd_lengths():
    for seconds, rate in [(2.0, 44100), (1.0, 48000), (6.0, 32000), (4.0, 22050)]:
        hls = HlsSegmenter(rate, 1, segment_seconds=seconds, playlist_segments=6)
        assert hls.segment_duration <= hls.target_duration == max(1, round(seconds + 0.49))
        assert seconds - 1024 / rate < hls.segment_duration <= seconds
    assert re.search(r"#EXT-X-TARGETDURATION:2\n", HlsSegmenter(RATE, 1).playlist())
