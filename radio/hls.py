"""Live HLS (RFC 8216) for one station: AAC in MPEG-TS segments and a sliding playlist.

One long-lived `AacEncoder` feeds every segment, so the audio is seamless across segment joins
(no priming gap per segment); each segment gets a fresh PyAV `mpegts` muxer and the packets keep
their continuous timestamps. A segment is a whole number of AAC frames (1024 samples), the
largest count that fits in `segment_seconds`, so every `EXTINF` is the same and
`EXT-X-TARGETDURATION` (its ceiling) never changes. Media sequence numbers only grow, also across
restarts (`start_sequence` = the `next_sequence` a state file kept); `EXT-X-DISCONTINUITY` goes
before the first segment of a segmenter started with `start_sequence > 0` (a restart) and before
the next segment after `mark_discontinuity()`. Segments stay fetchable for `grace_segments`
after they leave the playlist. With `out_dir`, the segments and `live.m3u8` are also written
there for nginx or a CDN origin: files appear atomically (temp file + `os.replace`) and old
segments are deleted after the grace period.

Everything runs on the caller's thread: `push` encodes (a few ms per second of audio) and
`playlist()` / `segment()` are dictionary lookups, so all three are safe on one asyncio loop.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from radio.encoders import AacEncoder, timestamp

PLAYLIST_CONTENT_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_CONTENT_TYPE = "video/mp2t"
_SEGMENT_NAME = re.compile(r"^seg(\d+)\.ts$")


@dataclass(frozen=True)
class Segment:
    """One finished segment."""

    sequence: int  # EXT-X-MEDIA-SEQUENCE number
    name: str  # file name, e.g. "seg42.ts"
    duration: float  # seconds (EXTINF)
    start: datetime  # wallclock of its first sample (EXT-X-PROGRAM-DATE-TIME), aware, UTC
    discontinuity: bool  # EXT-X-DISCONTINUITY before it
    discontinuity_number: int  # its discontinuity sequence number
    data: bytes  # the MPEG-TS bytes


class HlsSegmenter:
    """PCM [C, N] float32 in; a live playlist and its MPEG-TS segments out."""

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        *,
        segment_seconds: float = 2.0,
        playlist_segments: int = 6,
        bitrate_kbps: int = 96,
        start_sequence: int = 0,
        out_dir: Path | None = None,
        grace_segments: int = 6,
        output_sample_rate: int | None = None,  # e.g. 48000 from 32000; None = same
        output_channels: int | None = None,  # e.g. 2 to upmix mono; None = same
        start_discontinuity_sequence: int = 0,  # the `discontinuity_sequence` kept at shutdown
        playlist_name: str = "live.m3u8",
    ) -> None:
        if start_sequence < 0:
            raise ValueError(f"start_sequence must be >= 0, got {start_sequence}")
        if grace_segments < 0:
            raise ValueError(f"grace_segments must be >= 0, got {grace_segments}")
        self._enc = AacEncoder(
            sample_rate,
            channels,
            bitrate_kbps,
            output_sample_rate=output_sample_rate,
            output_channels=output_channels,
        )
        self.sample_rate = sample_rate
        self.output_sample_rate = rate = self._enc.output_sample_rate
        self._layout = "mono" if self._enc.output_channels == 1 else "stereo"
        frame = self._enc.frame_size
        if segment_seconds * rate < frame:
            raise ValueError(f"segment_seconds must be at least {frame / rate:.3f} s")
        self.frames_per_segment = int(segment_seconds * rate // frame)
        self.segment_duration = self.frames_per_segment * frame / rate  # seconds, every segment
        self.target_duration: int = max(1, math.ceil(self.segment_duration))
        if playlist_segments * self.segment_duration < 3 * self.target_duration:
            raise ValueError(
                f"playlist_segments={playlist_segments} lists less than 3 target durations"
            )
        self.playlist_segments = playlist_segments
        self.grace_segments = grace_segments
        self.next_sequence: int = start_sequence  # the number the next segment will get
        self.discontinuity_sequence: int = start_discontinuity_sequence  # of the last segment
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.playlist_name = playlist_name
        self._segments: deque[Segment] = deque()  # listed + grace, oldest first
        self._by_name: dict[str, Segment] = {}
        self._packets: list[av.Packet] = []  # the segment being filled
        # A segmenter that continues a sequence is a restart: the audio does not join up.
        self._pending_discontinuity = start_sequence > 0
        self._segment_discontinuity = False  # of the segment being filled
        self._pushed = 0  # input samples pushed so far
        self._anchor: tuple[int, datetime] | None = None  # (input sample, its wallclock)
        self._playlist = ""
        self._render_playlist()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_files()
            if not (self.out_dir / playlist_name).exists():  # else the last run's stays up
                self._write_atomic(self.playlist_name, self._playlist.encode())

    # -- input -----------------------------------------------------------------------------
    def push(self, pcm: np.ndarray, wallclock: datetime) -> None:
        """Encode pcm [C, N]; `wallclock` is when its first sample is heard (naive = UTC)."""
        if wallclock.tzinfo is None:
            wallclock = wallclock.replace(tzinfo=UTC)
        self._anchor = (self._pushed, wallclock)
        self._pushed += pcm.shape[1]
        self._take(self._enc.encode(pcm))

    def flush(self) -> None:
        """Encode what is buffered and publish it as a last (shorter) segment; push no more."""
        self._take(self._enc.flush())
        if self._packets:
            self._finish_segment()

    def mark_discontinuity(self) -> None:
        """The next segment to start gets EXT-X-DISCONTINUITY (use it when the audio restarts)."""
        self._pending_discontinuity = True

    # -- output (cheap: safe to call from the event loop at any time) -----------------------
    def playlist(self) -> str:
        """The current media playlist text."""
        return self._playlist

    def segment(self, name: str) -> bytes | None:
        """The bytes of a listed or recently listed segment, else None."""
        seg = self._by_name.get(name)
        return seg.data if seg is not None else None

    @property
    def segments(self) -> list[Segment]:
        """Segments still held (listed ones last), oldest first."""
        return list(self._segments)

    # -- segment assembly ------------------------------------------------------------------
    def _take(self, packets: list[av.Packet]) -> None:
        for p in packets:
            if not self._packets:
                self._segment_discontinuity = self._pending_discontinuity
                self._pending_discontinuity = False
            self._packets.append(p)
            if len(self._packets) == self.frames_per_segment:
                self._finish_segment()

    def _finish_segment(self) -> None:
        packets, self._packets = self._packets, []
        first_pts = timestamp(packets[0].pts)  # output-rate samples; the first is -initial_padding
        duration = sum(timestamp(p.duration) for p in packets) / self.output_sample_rate
        seq = self.next_sequence
        self.next_sequence += 1
        disc = self._segment_discontinuity
        self.discontinuity_sequence += int(disc)
        seg = Segment(
            sequence=seq,
            name=f"seg{seq}.ts",
            duration=duration,
            start=self._wallclock_of(first_pts),
            discontinuity=disc,
            discontinuity_number=self.discontinuity_sequence,
            data=self._mux(packets),
        )
        self._segments.append(seg)
        self._by_name[seg.name] = seg
        if self.out_dir is not None:
            self._write_atomic(seg.name, seg.data)
        dropped = []
        while len(self._segments) > self.playlist_segments + self.grace_segments:
            old = self._segments.popleft()
            del self._by_name[old.name]
            dropped.append(old.name)
        self._render_playlist()
        if self.out_dir is not None:
            self._write_atomic(self.playlist_name, self._playlist.encode())
            for name in dropped:
                (self.out_dir / name).unlink(missing_ok=True)

    def _wallclock_of(self, out_pts: int) -> datetime:
        """Wallclock of output sample `out_pts` (the encoder's timeline, priming < 0)."""
        assert self._anchor is not None, "a segment before any push"
        in_sample, wall = self._anchor
        seconds = out_pts / self.output_sample_rate - in_sample / self.sample_rate
        return wall + timedelta(seconds=seconds)

    def _mux(self, packets: list[av.Packet]) -> bytes:
        """A self-contained MPEG-TS file of these packets (pts continue across segments)."""
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as out:
            stream = out.add_stream("aac", rate=self.output_sample_rate, layout=self._layout)
            stream.codec_context.extradata = self._enc.extradata
            stream.time_base = Fraction(1, self.output_sample_rate)
            for p in packets:
                # Shift by the priming so the stream starts at pts 0 and never goes negative.
                p.pts = p.dts = timestamp(p.pts) + self._enc.initial_padding
                p.stream = stream
                out.mux(p)
        return buf.getvalue()

    def _render_playlist(self) -> None:
        listed = list(self._segments)[-self.playlist_segments :]
        first_seq = listed[0].sequence if listed else self.next_sequence
        if listed:
            disc_seq = listed[0].discontinuity_number - int(listed[0].discontinuity)
        else:
            disc_seq = self.discontinuity_sequence
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            "#EXT-X-INDEPENDENT-SEGMENTS",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{first_seq}",
            f"#EXT-X-DISCONTINUITY-SEQUENCE:{disc_seq}",
        ]
        for seg in listed:
            if seg.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            pdt = seg.start.astimezone(UTC).isoformat(timespec="milliseconds")
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{pdt.replace('+00:00', 'Z')}")
            lines.append(f"#EXTINF:{seg.duration:.5f},")
            lines.append(seg.name)
        self._playlist = "\n".join(lines) + "\n"

    # -- folder output ---------------------------------------------------------------------
    def _write_atomic(self, name: str, data: bytes) -> None:
        assert self.out_dir is not None
        tmp = self.out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.out_dir / name)

    def _remove_stale_files(self) -> None:
        """Delete segments of an earlier run that are past any grace period by now."""
        assert self.out_dir is not None
        keep_from = self.next_sequence - self.playlist_segments - self.grace_segments
        for path in self.out_dir.iterdir():
            m = _SEGMENT_NAME.match(path.name)
            if m and int(m.group(1)) < keep_from:
                path.unlink(missing_ok=True)
