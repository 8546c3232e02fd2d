"""One stream's lane of a decode batch: its tokens, its windows, its rows and its sampler.

A `Lane` holds everything one stream decodes with, and steps nothing itself: its
`DecodeBatch` creates it, prefills its windows and steps it with the others, through the small
interface below ("for the batch"). `TokenStream` is the stream's owner-facing handle; it
changes the lane's prompt, seed and sampling ("for the stream") and asks the batch to go on.

Windows: inside a window the lane feeds one position per decoder step. The sinusoidal position
table is finite (2048) and training clips were 30 s, so when a window is full the lane starts
a new one at position 0 whose prompt is the last `context` frames (`generate_continuation` on
tokens: nothing is re-encoded, nothing lost at the join). A prompt change is the same
continuation with new text, from a chosen frame; a seed one whose context is given tokens (an
uploaded clip) instead of the frames before.

Warm restarts (`WindowOptions.warm_restarts`): a window restart's prefill re-reads `context`
frames at once, seconds of work on a CPU every `window - context` frames. The frames it re-reads
are known one by one as the window is written, so the lane builds the next window beside this
one instead: in the window's last `context` steps it feeds a copy of its rows (the warm rows,
`Warm`) the next window's positions 0, 1, ... in the same decoder steps. Position q of the next
window holds the same tokens as position `start + q` of this one (the delayed layout shifts with
the frames), with pad tokens where codebook k's frame `q - 1 - delay[k]` is before the context.
At the restart the warm rows' cache becomes the rows' cache and their logits at the context's
last position are sampled as a prefill's would be. A prompt change, a seed or a new sampling
setting drops the warm rows (a prefill follows anyway); a change of the restarts' context
length (a radio shortening its restarts) drops them at the next step, and they begin again where
the new context starts if that is still ahead. Windows may end early (`window_frames`, from the
next window on): the warm rows then begin that much earlier.

Frames are numbered from the start of the stream. `history()` holds the last frames (enough for
rewinds, re-prefills and the codec's left context); older ones are forgotten, so memory is flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.blend import PLAIN_ROWS
from engine.conditioning import TextCondition
from engine.delay import PAD, delayed_layout
from engine.options import MIN_NEW_FRAMES, SamplingOptions, WindowOptions
from engine.rows import Change, Prompt, Rows

log = logging.getLogger(__name__)


@dataclass
class Warm:
    """The next window, built a step at a time beside this one: its rows are the lane's rows
    again, fed position `position - start` of the next window while this one feeds `position`."""

    start: int  # this window's position fed with the next window's position 0
    context: int  # frames of context the next window begins with
    ids: torch.Tensor  # [K, context + 1] what the warm rows were fed (what a prefill would take)
    keys: tuple[TextCondition | None, ...] = ()  # the rows of `logits` (None: the null row)
    logits: torch.Tensor | None = None  # [R, K, V] at position `context`, once fed
    guided: bool = True  # with the null row (the lane's own rows may have none: `drop_guidance`)


# A prefill's cost grows with its rows x frames, plus a part that does not: the weights read
# once and each layer's fixed work, which weigh in a prompt change's few rows. On 2 Zen 3 cores
# (musicgen-small, int8, 25 frames) 1, 2 and 4 rows took 103, 188 and 354 ms (120, 208 and 391
# in a run before), where in proportion to the rows 1 row would be 94 and 4 rows 376: a fixed
# part of 6-8 row-frames, fitted (`python bench/prompt_change.py`, its rows table)
FIXED_ROW_FRAMES = 7


@dataclass(frozen=True)
class Prefill:
    """One prefill as it ran: a window restart, a prompt change, a transition, a seed."""

    seconds: float  # wall time of the decoder's prefill
    rows: int  # decoder rows prefilled: one per text of the blends, and a guided null row
    frames: int  # context frames re-read

    def at_rows(self, rows: int) -> float:
        """What it would have taken with `rows` rows (the same frames): its seconds scaled by
        rows x frames plus the part that does not grow with them (`FIXED_ROW_FRAMES`)."""
        return (
            self.seconds
            * (rows * self.frames + FIXED_ROW_FRAMES)
            / (self.rows * self.frames + FIXED_ROW_FRAMES)
        )

    def plain_seconds(self, context: int) -> float:
        """What a plain prompt's prefill (PLAIN_ROWS rows) of `context` frames would take at
        this one's speed: `at_rows(PLAIN_ROWS)` scaled by the frames (a longer prefill's
        attention grows faster than its frames: a whole context's cold prefill at start took
        3.5-3.8 s where a 25-frame change's 0.18 s scales to 3.6 s)."""
        return self.at_rows(PLAIN_ROWS) * context / self.frames


def prefill_since(last: Prefill | None, before: Prefill | None) -> Prefill | None:
    """`last`, a stream's latest prefill, when it ran after `before` (the latest one when some
    work began); None when that work prefilled nothing."""
    return last if last is not None and last is not before else None


def prefilled_since(last: Prefill | None, before: Prefill | None) -> float:
    """Seconds of `prefill_since(last, before)`; 0 when that work prefilled nothing."""
    ran = prefill_since(last, before)
    return 0.0 if ran is None else ran.seconds


class Lane:
    def __init__(
        self,
        prompt: Prompt,
        sampling: SamplingOptions,
        window: WindowOptions,
        *,
        delays: torch.Tensor,
        guided: bool,
        device: torch.device,
        keep_frames: int = 1000,
        prompt_frames: torch.Tensor | None = None,
        warm: bool = False,
    ) -> None:
        """`delays`: [K] each codebook's delay (`engine.delay.codebook_delays`); `guided`: hold a
        null row; `prompt_frames`: optional [K, T] tokens to continue from (frames 0..T-1);
        `warm`: build each next window beside this one (warm restarts); `device`: where its
        sampling draws. Its tokens live on the CPU: a GPU's batch moves a step's ids there and
        its tokens back once for all lanes, not a copy and a wait per lane."""
        self.window = window
        self.builds_warm = warm  # warm restarts
        self.sampling = sampling
        self.delays = delays
        self.num_codebooks = int(delays.shape[0])
        self.max_delay = int(delays.max())
        self.device = device
        self.keep_frames = max(keep_frames, window.context)
        self.generator = self._make_generator(sampling.seed)
        self.steps = 0  # decoder steps run, for statistics
        self.prefills = 0  # window restarts and prompt changes
        self.warm_restarts = 0  # window restarts that took a warm window (no prefill)
        self.last_prefill: Prefill | None = None  # the latest prefill as it ran
        self._next_context: int | None = None  # the next window's context, when shorter
        # while set, every window restart re-reads at most this many frames (a radio that
        # cannot keep up shortens them; None: the window's `context`)
        self.restart_context: int | None = None
        # while set, every window from the next on ends at this position instead of
        # `window.window`: steps attend over fewer positions (a radio that cannot keep up
        # even with the shortest restarts shortens them; None: the whole window)
        self.window_frames: int | None = None
        # Complete frames [K, T] on the CPU; _history[:, i] is frame _offset + i.
        start = torch.zeros(self.num_codebooks, 0) if prompt_frames is None else prompt_frames
        self._history = start.to(torch.long).cpu().clone()
        self._offset = 0
        # A seed: the decoder's context is `_seed` [K, S] followed by the frames from `_seed_at`
        # on, until `context` frames have been made after it; no rewind before `_floor`.
        self._seed: torch.Tensor | None = None
        self._seed_at = 0
        self._floor = 0
        # The prompt changes still in reach of a rewind, the last one in force now.
        self._changes = [Change(self.complete, prompt)]
        # the null row: what the settings ask (`guided`), unless guidance is dropped meanwhile
        # (`drop_guidance`: the radio's last rung); `rows.guided` is what the lane holds now
        self.guided_wanted = guided
        self.unguided = False
        self.rows = Rows.of(self._changes[-1], guided)
        # The window: delayed layout [K, W + 1] (-1 where unknown), the position fed next, the
        # frames of context it began with, and the stream frame of its frame 0. None: no window
        # yet (the batch starts one before the lane's first step).
        self._seq: torch.Tensor | None = None
        self._fed = 0
        self._context_len = 0
        self._end = window.window  # the position where this window is full
        self._window_first = 0
        self.warm: Warm | None = None  # the next window while it is built beside this one
        self._taken: Warm | None = None  # the warm window at a restart, until the batch takes it

    # -- for the stream --------------------------------------------------------------------

    @property
    def complete(self) -> int:
        """Number of complete frames written since the stream began."""
        return self._offset + self._history.shape[1]

    def history(self) -> tuple[torch.Tensor, int]:
        """(tokens [K, T], offset): the kept complete frames; tokens[:, i] is frame offset + i."""
        return self._history, self._offset

    @property
    def seed_frames(self) -> torch.Tensor | None:
        return self._seed

    @property
    def seeded_at(self) -> int:
        return self._floor

    @property
    def prompt(self) -> Prompt:
        """The prompt of the latest change (a transition's new blend)."""
        return self._changes[-1].new

    def conditions_in_use(self) -> list[TextCondition]:
        """Every condition the lane may still need: its rows and those of changes a rewind
        can reach."""
        found = list(self.rows.conditions)
        for change in self._changes:
            for c in change.conditions():
                if all(c is not f for f in found):
                    found.append(c)
        return found

    def check_rewind(self, frame: int) -> None:
        if frame < self._floor:
            raise ValueError(
                f"from_frame {frame} is too far back: the stream was seeded at frame {self._floor}"
            )
        if frame < max(self._offset, 0):
            raise ValueError(
                f"from_frame {frame} is too far back: frames before {self._offset} are no longer kept"
            )

    def set_prompt(
        self, prompt: Prompt, frame: int, glide_frames: int = 0, context: int | None = None
    ) -> None:
        """From `frame` (after `truncate(frame)`) on, `prompt`; with `glide_frames` > 0 the
        weights glide there from the blend heard before `frame`. The batch then starts a new
        window (`needs_window`), continuing from the last `context` frames (None: the window's
        `context`; later windows re-read the whole context again)."""
        old = self._blend_at(frame - 1) if glide_frames > 0 else None
        self._changes = [c for c in self._changes if c.start < frame]
        self._changes.append(Change(frame, prompt, old, glide_frames))
        while len(self._changes) > 1 and self._changes[1].start <= self._offset:
            self._changes.pop(0)  # no rewind reaches it any more
        self.rows = Rows.of(self._changes[-1], self.guided_next)
        self._seq = self.warm = None
        self._next_context = context

    def seed(self, frames: torch.Tensor, frame: int) -> None:
        """The decoder's context from `frame` on is `frames` [K, S] then what is made after it
        (after `truncate(frame)`); the batch then starts a new window."""
        assert frames.ndim == 2 and frames.shape[0] == self.num_codebooks, list(frames.shape)
        self._seed = frames.to(torch.long).cpu().clone()
        self._seed_at = self._floor = frame
        self._seq = self.warm = None

    def set_sampling(self, sampling: SamplingOptions, guided: bool) -> bool:
        """New sampling settings; True when the null row comes or goes (the caller truncates
        and the batch starts a new window)."""
        if sampling.seed != self.sampling.seed:
            self.generator = self._make_generator(sampling.seed)
        self.sampling = sampling
        self.guided_wanted = guided
        if self.guided_next == self.rows.guided:
            return False
        self.rows = self.rows.with_guided(self.guided_next)
        self._seq = self.warm = None
        return True

    def drop_guidance(self, on: bool) -> bool:
        """While `on`, the lane holds no null row: it is sampled from its conditional rows alone
        (guidance off; a step's rows halved: the radio's last rung when it cannot keep up).
        The null row goes at once (True: the rows changed; the others keep their cache) and
        comes back without a prefill: the next warm rows begun after `on` ends are built with
        it, and the window restart that takes them takes it (a prefill before then, a prompt
        change's, has it at once)."""
        self.unguided = on
        if not on or not self.rows.guided:
            return False
        self.rows = self.rows.with_guided(False)
        if self.warm is not None:
            self.warm.guided = False
        return True

    def truncate(self, frame: int) -> None:
        """Drop the frames from `frame` on (a rewind: what comes next replaces them)."""
        self._history = self._history[:, : max(0, frame - self._offset)]

    def context(self) -> torch.Tensor:
        """[K, <= context] the frames a new window continues from: the last `context` frames,
        or after a seed the seed's frames followed by those made since."""
        frames = self._history
        if self._seed is not None:
            made = frames[:, self._seed_at - self._offset :]
            if made.shape[1] >= self.window.context:
                self._seed = None  # the seed has left the context
            else:
                frames = torch.cat([self._seed, made], dim=1)
        return frames[:, -self.window.context :] if frames.shape[1] else frames

    # -- for the batch ---------------------------------------------------------------------

    @property
    def needs_window(self) -> bool:
        """No window yet, or the window is full: the batch prefills a new one."""
        return self._seq is None or self._fed >= self._end

    @property
    def position(self) -> int:
        """The position the next step feeds (and the last one sampled)."""
        return self._fed

    def begin_window(self) -> torch.Tensor:
        """A new window from position 0: the ids [K, C + 1] to prefill (BOS and the last
        `context` frames in the delayed layout). A glide already over settles first."""
        full = self._seq is not None
        context = self.context()
        limits = [n for n in (self._next_context, self.restart_context) if n is not None]
        if full and self.warm is not None and self.warm.logits is not None:
            limits.append(self.warm.context)  # (restarts lengthened during the warm rows)
        if limits:  # a prompt change's shorter re-read (once), a shortened window restart
            context = context[:, context.shape[1] - min(min(limits), context.shape[1]) :]
        warm = self.warm if full else None
        if warm is not None and (warm.logits is None or warm.context != context.shape[1]):
            warm = None  # (no warm window to take: a prefill)
        taken = warm is not None
        # the null row as the warm rows were built, or (a prefill) as wanted now
        guided = self.guided_next if warm is None else warm.guided
        if guided != self.rows.guided:
            self.rows = self.rows.with_guided(guided)
        if full:
            log.debug(
                "window full at frame %d (position %d): a new window from its last %d frames (%s)",
                self.complete,
                self._fed,
                context.shape[1],
                "warm" if taken else "prefill",
            )
        self._next_context = None
        self._taken, self.warm = self.warm, None  # for `take_warm`
        self._context_len = context.shape[1]
        self._window_first = self.complete - self._context_len
        # a shortened window still makes a second of new music beyond its context
        limit = self.window_frames or self.window.window
        self._end = min(self.window.window, max(limit, self._context_len + MIN_NEW_FRAMES))
        self._settle(self._frame_of(self._context_len + 1))
        layout = delayed_layout(context, self.delays, self.window.window + 1)
        self._seq = layout  # [K, W + 1], on the CPU (the batch moves a step's inputs once)
        return self._seq[:, : self._context_len + 1]

    def weights(self, position: int) -> list[float]:
        """The conditional rows' weights for the step that samples `position`."""
        return self.rows.weights(self._frame_of(position))

    def row_keys(self) -> tuple[tuple[TextCondition | None, bool], ...]:
        """The rows the lane steps, in order: (condition or None for the null row, warm) for
        its rows, then the same again for the warm rows while it builds the next window."""
        keys = self.rows.keys
        warm = self._warm_rows().keys if self.warm is not None else ()
        return tuple((k, False) for k in keys) + tuple((k, True) for k in warm)

    @property
    def warm_count(self) -> int:
        """The warm rows the lane steps after its own (0 when it builds no next window now)."""
        return 0 if self.warm is None else len(self.rows.conditions) + self.warm.guided

    def inputs(self) -> tuple[torch.Tensor, list[int]]:
        """What a step feeds the lane's rows (`row_keys`): ids [R, K] and each row's position."""
        assert self._seq is not None, "the lane has no window"
        rows = self.rows.count
        ids = self._seq[None, :, self._fed].expand(rows, -1)
        if self.warm is None:
            return ids, [self._fed] * rows
        q = self._fed - self.warm.start
        column = torch.where(q - 1 - self.delays < 0, PAD, self._seq[:, self._fed])
        if q <= self.warm.context:
            self.warm.ids[:, q] = column
        warm = self.warm_count
        return torch.cat([ids, column[None].expand(warm, -1)]), [self._fed] * rows + [q] * warm

    def fed_warm(self, logits: torch.Tensor) -> None:
        """After a step over `inputs()`: logits [R, K, V] of the warm rows. Kept once they are
        those of the next window's last context position (what its prefill would sample)."""
        assert self.warm is not None
        if self._fed - self.warm.start == self.warm.context:
            self.warm.logits = logits.clone()
            self.warm.keys = self._warm_rows().keys

    def take_warm(self, ids: torch.Tensor) -> torch.Tensor | None:
        """At a window restart, after `begin_window` gave `ids` [K, C + 1]: the warm rows'
        logits for the lane's rows (what a prefill of `ids` would return), or None when there
        is no warm window that matches (the batch prefills). The batch then makes the warm
        rows' cache the rows' cache."""
        warm, self._taken = self._taken, None
        if warm is None or warm.logits is None or warm.context != ids.shape[1] - 1:
            return None
        assert torch.equal(warm.ids, ids), "the warm rows were fed other ids than the prefill's"
        index = [next((j for j, w in enumerate(warm.keys) if w is k), -1) for k in self.rows.keys]
        if -1 in index:
            return None
        return warm.logits[index]

    def prefilled(self, tokens: torch.Tensor, seconds: float | None) -> bool:
        """Take the tokens [K] a prefill of `begin_window`'s ids sampled, and the prefill's wall
        time (None: the window was warm, nothing prefilled). True when the rows changed (a
        glide ended)."""
        self._fed = self._context_len + 1
        if seconds is None:
            self.warm_restarts += 1
        else:
            self.prefills += 1
            self.last_prefill = Prefill(seconds, self.rows.count, self._context_len)
        self._accept(tokens)
        changed = self._settle(self._frame_of(self._fed + 1))
        return self._begin_warm() or changed

    def stepped(self, tokens: torch.Tensor) -> bool:
        """Take the tokens [K] a decoder step over `position` sampled (position + 1). True when
        the rows changed (a glide ended: rows of weight 0 leave; the warm rows came)."""
        self._fed += 1
        self.steps += 1
        self._accept(tokens)
        changed = self._settle(self._frame_of(self._fed + 1))
        return self._begin_warm() or changed

    # -- inside ----------------------------------------------------------------------------

    def _begin_warm(self) -> bool:
        """Start the warm rows when this window reaches the position where the next window's
        context begins: `window - max_delay - C`, C the frames the next restart re-reads (the
        next window's context ends with the last frame complete at the restart); drop them
        when C shrank since. True when the rows changed."""
        if not self.builds_warm or self._seq is None:
            return False
        context = min(self.window.context, self.restart_context or self.window.context)
        dropped = False
        if self.warm is not None:
            if self.warm.context <= context:
                # the same, or the restarts were lengthened while the warm rows were fed: this
                # restart keeps their shorter context (`begin_window`), the next ones re-read
                # more. Dropped, they could not come again (their start is behind) and the
                # restart would prefill the longer context: two int4 stations bridged 5 s when
                # the radio's ladder climbed back a few seconds before their windows' ends
                return False
            # the restarts were shortened while the warm rows were fed: the restart would
            # prefill anyway, so they go now, and come again at the new start if it is still
            # ahead (a radio's ladder moving in the first window's warm rows)
            self.warm, dropped = None, True
        start = self._end - self.max_delay - context
        # its tokens must all be this window's own (not its context's), fed from here on
        if self._fed != start or start <= self._context_len:
            return dropped
        ids = torch.full((self.num_codebooks, context + 1), -1)
        self.warm = Warm(start, context, ids, guided=self.guided_next)
        return True

    @property
    def guided_next(self) -> bool:
        """Whether the lane's next rows hold the null row (a prefill's, warm rows begun now):
        guidance wanted and not dropped. Its rows now may still lack it (`drop_guidance`)."""
        return self.guided_wanted and not self.unguided

    def _warm_rows(self) -> Rows:
        """The rows the warm rows copy: the lane's own, with the null row as they were begun."""
        assert self.warm is not None
        guided = self.warm.guided
        return self.rows if guided == self.rows.guided else self.rows.with_guided(guided)

    def _make_generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _frame_of(self, position: int) -> int:
        """The stream frame whose first codebook position `position` of this window holds."""
        return self._window_first + position - 1

    def _blend_at(self, frame: int) -> Prompt:
        """The blend heard at `frame` (of the changes still kept)."""
        change = next((c for c in reversed(self._changes) if c.start <= frame), self._changes[0])
        return change.at(frame)

    def _settle(self, frame: int) -> bool:
        """End a glide that is over by the step sampling `frame`: its rows of weight 0 leave."""
        if self.rows.glide is None or self.rows.gliding(frame):
            return False
        before = len(self.rows.conditions)
        self.rows = self.rows.settled()
        return len(self.rows.conditions) != before

    def _accept(self, tokens: torch.Tensor) -> None:
        """Keep the sampled tokens [K] of position `_fed` where the layout does not force them
        (pads and known context), and move a newly complete frame into the history."""
        assert self._seq is not None
        position = self._fed
        known = self._seq[:, position]
        self._seq[:, position] = torch.where(known == -1, tokens, known)
        frame = position - 1 - self.max_delay  # window frame completed by this position
        if frame >= self._context_len:
            index = frame + 1 + self.delays  # [K] position of each codebook
            column = self._seq.gather(1, index[:, None])  # [K, 1]
            assert bool((column != PAD).all()), "a complete frame holds a pad token"
            self._history = torch.cat([self._history, column], dim=1)
            if self._history.shape[1] > 2 * self.keep_frames:
                drop = self._history.shape[1] - self.keep_frames
                self._history = self._history[:, drop:].clone()
                self._offset += drop
