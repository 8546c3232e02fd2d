"""The music watchdog: notices when a station's music goes wrong, and says how to re-anchor it.

Long MusicGen runs can fall into silence, a stuck loop (the same seconds of tokens over and over)
or a collapse (a codebook down to a few tokens). One `Watchdog` per station, fed by the
generator's worker thread with each chunk it made: the chunk's token frames (int [K, n], which
the engine already has) and its audio (float [C, n * hop]). Each detector is incremental, a few
numpy operations per chunk, no model work:

- `SilenceDetector`: the RMS of each frame (20 ms) of audio in dBFS; `silence_seconds` of frames
  in a row below `silence_db` is silence.
- `LoopDetector`: the last `loop_seconds` of frames; a frame is *repeated* when the block of
  `BLOCK_FRAMES` frames ending at it (every codebook) already occurred earlier in that stretch.
  With counts per block kept as frames come and go, repeated = frames - distinct blocks; a share
  of at least `loop_share` is a loop. A loop of period p running for T frames repeats T - p of
  them, so any loop shorter than (1 - loop_share) x loop_seconds is found within loop_seconds.
- `CollapseDetector`: distinct tokens per codebook over the last `collapse_seconds` (counts per
  codebook and token, kept as frames come and go); fewer than `collapse_tokens` in any codebook
  is a collapse.

A detector judges only a full stretch, and every detector starts afresh when the stream does not
go on where the previous chunk ended (a prompt change, a re-anchor), so a re-anchor is never
judged by the music before it. Random tokens (a random-weight model) and real music repeat no
block of 4 frames and use hundreds of tokens per codebook: far from every threshold.

The recovery, `radio.generator`'s: re-anchor the stream (`engine.AudioStream.restart`) a little
ahead of what the listeners hear, with the last `context_seconds` of tokens as its context (none
when the same problem came back within `REPEAT_SECONDS` of the previous re-anchor: the short
context did not help) and the station's current prompt; the old audio past that point fades out
while the new fades in over `crossfade_seconds` (`Crossfade`, from `AudioTail`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from radio.config import WatchdogConfig

PROBLEMS = ("silence", "loop", "collapse")  # what the watchdog finds
BLOCK_FRAMES = 4  # a loop repeats blocks of this many frames (80 ms)
REPEAT_SECONDS = 60.0  # the same problem again within this long: re-anchor with no context
_TOKEN_SPACE = 2048  # MusicGen's codebook size (grown when a larger token is seen)
_MIX = np.random.default_rng(12345).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


@dataclass(frozen=True)
class Problem:
    """What the watchdog found."""

    kind: str  # "silence", "loop" or "collapse"
    detail: str  # in words: "silence for 5 s"


@dataclass(frozen=True)
class Plan:
    """Where and how to re-anchor."""

    frame: int  # the stream goes on from this frame
    context_frames: int  # with this many of its frames before it as the decoder's context


class SilenceDetector:
    """`frames` frames in a row whose RMS is below `threshold_db` dBFS."""

    def __init__(self, threshold_db: float, frames: int) -> None:
        self.power = 10.0 ** (threshold_db / 10.0)  # mean square of the threshold level
        self.frames = frames
        self.run = 0  # quiet frames in a row so far

    def reset(self) -> None:
        self.run = 0

    def feed(self, pcm: np.ndarray, n: int) -> bool:
        """pcm [C, n * hop] of n frames: has the quiet run reached `frames`?"""
        power = np.square(pcm.reshape(pcm.shape[0], n, -1), dtype=np.float64).mean(axis=(0, 2))
        found = False
        for quiet in (power < self.power).tolist():
            self.run = self.run + 1 if quiet else 0
            found = found or self.run >= self.frames
        return found


class LoopDetector:
    """Share of the last `frames` frames whose block of BLOCK_FRAMES frames occurred earlier in
    them (see the module docstring)."""

    def __init__(self, frames: int, share: float) -> None:
        self.frames = frames
        self.share = share
        self.reset()

    def reset(self) -> None:
        self._blocks: deque[tuple[int, ...]] = deque()  # each frame's block, oldest first
        self._counts: dict[tuple[int, ...], int] = {}  # block -> frames in the stretch with it
        self._where: dict[tuple[int, ...], int] = {}  # block -> the frame it ended at last
        self._recent: deque[int] = deque(maxlen=BLOCK_FRAMES)  # keys of the last frames
        self._seen = 0  # frames fed since the reset
        self.period = 0  # frames between the last repeated block and its previous occurrence

    @property
    def repeated(self) -> float:
        """The share of the stretch made of repeated blocks (0 until it is full)."""
        if self._seen < self.frames + BLOCK_FRAMES - 1:
            return 0.0
        return 1.0 - len(self._counts) / len(self._blocks)

    def feed(self, tokens: np.ndarray) -> bool:
        """tokens [K, n]: is the stretch, now, a loop?"""
        for key in frame_keys(tokens).tolist():
            self._seen += 1
            self._recent.append(key)
            if len(self._recent) < BLOCK_FRAMES:
                continue
            block = tuple(self._recent)  # the keys of the last BLOCK_FRAMES frames
            if block in self._where:
                self.period = self._seen - self._where[block]
            self._where[block] = self._seen
            self._blocks.append(block)
            self._counts[block] = self._counts.get(block, 0) + 1
            if len(self._blocks) > self.frames:
                self._drop(self._blocks.popleft())
        return self.repeated >= self.share

    def _drop(self, block: tuple[int, ...]) -> None:
        left = self._counts[block] - 1
        if left:
            self._counts[block] = left
        else:
            del self._counts[block]
            del self._where[block]


def frame_keys(tokens: np.ndarray) -> np.ndarray:
    """tokens [K, n] -> [n] uint64: one key per frame (all K codebooks), equal frames equal keys
    (a random linear hash: two different frames collide with odds of about 2^-50)."""
    k = tokens.shape[0]
    assert k <= len(_MIX), f"{k} codebooks: the key mixes at most {len(_MIX)}"
    return (tokens.astype(np.uint64) * _MIX[:k, None]).sum(axis=0, dtype=np.uint64)


class CollapseDetector:
    """Distinct tokens per codebook over the last `frames` frames; fewer than `tokens` in any
    codebook is a collapse."""

    def __init__(self, frames: int, tokens: int) -> None:
        self.frames = frames
        self.tokens = tokens
        self.codebook = -1  # the collapsed codebook, after feed() said so
        self.distinct = 0  # ... and its distinct tokens
        self._counts: np.ndarray | None = None  # [K, V] frames per codebook and token
        self.reset()

    def reset(self) -> None:
        self._ring: np.ndarray | None = None  # [K, frames] the stretch's tokens, circular
        self._filled = 0  # frames in the ring
        self._pos = 0  # where the next frame goes
        if self._counts is not None:
            self._counts[:] = 0

    def feed(self, tokens: np.ndarray) -> bool:
        """tokens [K, n]: has a codebook collapsed over the stretch, now?"""
        k, n = tokens.shape
        tokens = tokens[:, -self.frames :].astype(np.int64)
        self._make_room(k, int(tokens.max(initial=0)) + 1)
        assert self._ring is not None and self._counts is not None
        rows = np.broadcast_to(np.arange(k)[:, None], tokens.shape)
        slots = (self._pos + np.arange(tokens.shape[1])) % self.frames
        # the frames in occupied slots leave the stretch (before it is full, [0, filled) are)
        leaving = slots if self._filled == self.frames else slots[slots < self._filled]
        np.subtract.at(self._counts, (rows[:, : len(leaving)], self._ring[:, leaving]), 1)
        np.add.at(self._counts, (rows, tokens), 1)
        self._ring[:, slots] = tokens
        self._pos = (self._pos + tokens.shape[1]) % self.frames
        self._filled = min(self.frames, self._filled + tokens.shape[1])
        if self._filled < self.frames:
            return False
        distinct = (self._counts > 0).sum(axis=1)  # [K]
        self.codebook = int(distinct.argmin())
        self.distinct = int(distinct[self.codebook])
        return self.distinct < self.tokens

    def _make_room(self, k: int, space: int) -> None:
        if self._ring is None:
            self._ring = np.zeros((k, self.frames), np.int64)
        assert self._ring.shape[0] == k, f"{k} codebooks, the stretch holds {self._ring.shape[0]}"
        if self._counts is None or self._counts.shape[0] != k:
            self._counts = np.zeros((k, _TOKEN_SPACE), np.int32)
        if space > self._counts.shape[1]:
            grown = np.zeros((k, space), np.int32)
            grown[:, : self._counts.shape[1]] = self._counts
            self._counts = grown


class Watchdog:
    """One station's detectors, and the audio a re-anchor crossfades from (see the module
    docstring); worker thread only."""

    def __init__(self, config: WatchdogConfig, frame_rate: int, hop: int) -> None:
        self.config = config
        self.frame_rate = frame_rate
        self.hop = hop
        self.silence = SilenceDetector(config.silence_db, self._frames(config.silence_seconds))
        self.loop = LoopDetector(self._frames(config.loop_seconds), config.loop_share)
        self.collapse = CollapseDetector(
            self._frames(config.collapse_seconds), config.collapse_tokens
        )
        self.tail = AudioTail(round(config.crossfade_seconds * frame_rate) * hop)
        self.fade: Crossfade | None = None  # a re-anchor's crossfade under way
        self.next_frame: int | None = None  # where the stream should go on
        self._last: tuple[str, int] | None = None  # (kind, frame) of the last re-anchor

    def _frames(self, seconds: float) -> int:
        return max(1, round(seconds * self.frame_rate))

    def reset(self) -> None:
        """Start every detector afresh (the stream did not go on where it was)."""
        self.silence.reset()
        self.loop.reset()
        self.collapse.reset()

    def chunk(
        self, start: int, tokens: np.ndarray, pcm: np.ndarray
    ) -> tuple[np.ndarray, Problem | None]:
        """The chunk of frames [start, start + n) the stream made: tokens [K, n], pcm
        [C, n * hop] -> (the pcm to play: crossfaded after a re-anchor, what went wrong)."""
        if self.fade is not None:
            pcm = self.fade.apply(start * self.hop, pcm)
            if self.fade.done:
                self.fade = None
        self.tail.add(start * self.hop, pcm)
        return pcm, self.feed(start, tokens, pcm)

    def feed(self, start: int, tokens: np.ndarray, pcm: np.ndarray) -> Problem | None:
        """The detectors' verdict after the chunk of frames [start, start + n)."""
        n = tokens.shape[1]
        if start != self.next_frame:
            self.reset()
        self.next_frame = start + n
        cfg = self.config
        silent = self.silence.feed(pcm, n)
        collapsed = self.collapse.feed(tokens)
        looped = self.loop.feed(tokens)
        if silent:
            return Problem("silence", f"silence for {_seconds(cfg.silence_seconds)}")
        if collapsed:
            return Problem(
                "collapse",
                f"codebook {self.collapse.codebook + 1} used {self.collapse.distinct} distinct "
                f"token(s) over {_seconds(cfg.collapse_seconds)}",
            )
        if looped:
            return Problem(
                "loop",
                f"a loop: the same {_seconds(self.loop.period / self.frame_rate)} of tokens "
                f"repeat over {self.loop.repeated:.0%} of the last {_seconds(cfg.loop_seconds)}",
            )
        return None

    def plan(self, problem: Problem, stream_frame: int, earliest: int) -> Plan:
        """Where to re-anchor a stream that has made frames up to `stream_frame`: as far back as
        the crossfade wants, not before `earliest` (what listeners heard, a prompt change) and
        not after `stream_frame`; with `context_seconds` of context, or none when the same
        problem came back within REPEAT_SECONDS."""
        back = round(self.config.crossfade_seconds * self.frame_rate)
        frame = min(max(stream_frame - back, earliest), stream_frame)
        context = round(self.config.context_seconds * self.frame_rate)
        if self._last is not None:
            kind, at = self._last
            if kind == problem.kind and frame - at < REPEAT_SECONDS * self.frame_rate:
                context = 0
        return Plan(frame, context)

    def reanchored(self, problem: Problem, frame: int) -> None:
        """The stream was re-anchored at `frame`: the old audio from there (not heard yet)
        fades into the new; the detectors start afresh."""
        self._last = (problem.kind, frame)
        old = self.tail.since(frame * self.hop)
        self.fade = Crossfade(old, frame * self.hop) if old is not None else None
        self.next_frame = frame
        self.reset()

    def interrupted(self) -> None:
        """The stream does not go on as re-anchored (a failure, a prompt change): no
        crossfade from the audio before."""
        self.fade = None


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if abs(value - round(value)) < 0.05 else f"{value:.1f} s"


class AudioTail:
    """The last `keep` samples a station made, numbered from the stream's start (for the
    crossfade of a re-anchor, which rewinds into them)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._parts: deque[tuple[int, np.ndarray]] = deque()  # (first sample, pcm [C, n])

    def add(self, start: int, pcm: np.ndarray) -> None:
        """pcm [C, n] from sample `start`; what was kept from `start` on is replaced."""
        self._cut(start)
        self._parts.append((start, pcm))
        # drop the oldest part while the others still hold `keep` samples
        while len(self._parts) > 1 and start + pcm.shape[1] - self._parts[1][0] >= self.keep:
            self._parts.popleft()

    def since(self, sample: int) -> np.ndarray | None:
        """The kept audio from `sample` on, [C, m]; None when nothing from there is kept."""
        out = [p[:, max(sample - s, 0) :] for s, p in self._parts if s + p.shape[1] > sample]
        if not out or self._parts[0][0] > sample:
            return None
        return np.concatenate(out, axis=1)

    def _cut(self, sample: int) -> None:
        while self._parts and self._parts[-1][0] >= sample:
            self._parts.pop()
        if self._parts:
            s, p = self._parts[-1]
            if s + p.shape[1] > sample:
                self._parts[-1] = (s, p[:, : sample - s])


class Crossfade:
    """After a re-anchor at sample `start`: the old audio from there, old [C, m], fades out while
    the new fades in (equal power: sin/cos ramps, no dip in loudness), over m samples."""

    def __init__(self, old: np.ndarray, start: int) -> None:
        self.old = old
        self.start = start

    @property
    def done(self) -> bool:
        return self.old.shape[1] == 0

    def apply(self, start: int, pcm: np.ndarray) -> np.ndarray:
        """pcm [C, n] of the new audio from sample `start` -> the same, blended where it overlaps
        the old audio."""
        m = self.old.shape[1]
        i = start - self.start
        k = min(max(m - i, 0), pcm.shape[1])
        if i < 0 or k == 0:
            self.old = self.old[:, :0]
            return pcm
        t = (np.arange(i, i + k, dtype=np.float64) + 0.5) / m
        gain_new = np.sin(0.5 * np.pi * t).astype(np.float32)
        gain_old = np.cos(0.5 * np.pi * t).astype(np.float32)
        out = pcm.copy()
        out[:, :k] = pcm[:, :k] * gain_new + self.old[:, i : i + k] * gain_old
        if i + k >= m:
            self.old = self.old[:, :0]
        return out
