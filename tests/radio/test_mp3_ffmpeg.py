"""A real player on the MP3 mount: ffmpeg decodes 20 s of `/main.mp3` (with ICY metadata, which
ffmpeg asks for by default) and the audio arrives exactly at wall-clock rate, without errors."""

from __future__ import annotations

import subprocess
import time

from tests.helpers import require_tool

SECONDS = 20.0


def test_ffmpeg_decodes_20_s_of_the_mp3_mount_at_wall_clock_rate(radio_factory):
    ffmpeg = require_tool("ffmpeg")
    radio = radio_factory()
    url = f"{radio.base_url}/main.mp3"
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", url, "-t", str(SECONDS + 1), "-f", "null", "-"]
    cmd += ["-progress", "pipe:1", "-stats_period", "0.25"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress: list[tuple[float, float]] = []  # (wall seconds, decoded seconds)
    try:
        for line in proc.stdout:
            if line.startswith("out_time_us="):
                us = line.strip().split("=", 1)[1]
                if us.isdigit():
                    progress.append((time.monotonic() - started, int(us) / 1e6))
        errors = proc.stderr.read()
        assert proc.wait(10) == 0, errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    assert errors.strip() == "", f"ffmpeg reported decode errors:\n{errors}"
    # After the burst, a reader that keeps up decodes d(t) = t + const. A reader starved of CPU
    # (a loaded machine) falls below that line for a while, never above it: audio that was not
    # sent yet cannot be decoded. So the rate is taken between the upper envelope of an early
    # and of a late window of ffmpeg's progress reports.
    end = progress[-1][0]
    early = [p for p in progress if 1.5 <= p[0] <= 5.0]
    late = [p for p in progress if p[0] >= end - 5.0]
    (t0, d0), (t1, d1) = (max(w, key=lambda p: p[1] - p[0]) for w in (early, late))
    assert t1 - t0 >= SECONDS - 10, progress
    rate = (d1 - d0) / (t1 - t0)
    print(f"\nffmpeg decoded {d1 - d0:.2f} s of audio in {t1 - t0:.2f} s of wall time ({rate:.4f})")
    assert abs(rate - 1) < 0.02, rate
    # the whole read: 21 s of audio took about 21 s less the ~1 s burst
    assert SECONDS - 1 < wall < SECONDS + 3, wall
