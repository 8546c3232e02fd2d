"""The stepper: one decoder forward and one sampling call per step for every stream of a batch.

A decode step on a CPU or a small GPU batch is bound by reading the weights, not by the maths,
so N streams in one step cost little more than one. A lone stream is a batch of one. The batch
creates its streams' lanes (`open`, `engine.lane.Lane`), owns the KV cache and the stacked
cross-attention inputs, prefills the lanes' windows and steps them all together.

Rows: each lane owns a group of consecutive rows, its conditional rows (one per text of its
blend; a transition holds both blends' texts) and then its null row (classifier-free
guidance; in a batch of several streams every lane keeps it, so that sampling takes the same
rows from each):

    rows  [ a:c1  a:null | b:c1  b:c2  b:null | c:c1  c:null ]       lanes a, b (a blend), c

The cache holds exactly those rows. When a lane's rows change (a prompt with another number of
texts, a transition beginning or ending) the batch lays its rows out anew: rows that stay keep
their cache (copied), new ones are prefilled. Rows at different points of their windows attend
with a per-row mask (`Decoder.step_logits`; our kernels: each row up to its own
position). After the forward, `engine.rows.mix_rows` sums each lane's conditional rows by
weight (nothing to do when every lane has one), and one sampling call guides and draws for all.

Warm restarts (`engine.lane`, "Warm restarts"): while a lane builds its next window its group
holds its rows twice, the warm copies after its own, at their own positions; they take no part
in sampling. At the restart the warm rows' cache moves into the rows' places and nothing is
prefilled. The compiled step (`engine.static_step`) prefills instead (its shapes are fixed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from engine.conditioning import TextCondition, condition_rows
from engine.decoder import CrossKV, Decoder, concat_cross
from engine.delay import codebook_delays
from engine.kv_cache import KVCache
from engine.lane import Lane
from engine.options import SamplingOptions, WindowOptions
from engine.rows import Prompt, mix_rows
from engine.sampling import sample_streams
from engine.static_step import Mix, StaticStep
from engine.threads import barrier_regions

log = logging.getLogger(__name__)

RowKey = tuple[TextCondition | None, bool]  # a row: its condition (None: null), warm or not

# A lane's new text is folded into its cross-attention (`Decoder.fold`: tens of ms on a CPU,
# fewer bytes a step from then on) this many steps after its rows were laid out, not before
# its prefill: a prompt change's first audio waits for none of it (the radio's first read after
# it is half a chunk of 5 frames, the codec's 5 of lookahead and the codebooks' delay of 3: 12
# steps), nor do the reads just after, while the station has little audio ahead (folded 16
# steps in, in the second read, 70 ms more made a chunk 7 ms late and the station bridged).
# Until then the steps read the projections (~1% slower on 2 Zen 3 cores, ~10% on Zen 4).
FOLD_AFTER_STEPS = 100


class DecodeBatch:
    def __init__(
        self, decoder: Decoder, window: WindowOptions, size: int, compile: str = "none"
    ) -> None:
        """`size`: the streams it will hold (`open` them all before the first step);
        `compile`: "none", or how the step runs `engine.static_step` ("eager", "compile",
        "graphs")."""
        if size < 1:
            raise ValueError(f"a batch holds at least one stream, got {size}")
        self.decoder = decoder
        self.window = window.validate(decoder.max_positions)
        self.size = size
        self.lanes: list[Lane] = []
        self.steps = 0  # batched decoder steps run
        self.folds = 0  # texts folded into the cross-attention after their lanes' prefill
        self.cache = decoder.new_cache(0, window.window)
        # Where warm rows come and go (twice a window per station) the layout changes often:
        # two buffers, each with room for the rows laid out so far and their warm copies, take
        # turns (the cache before a change is the spare the next one writes into), allocated
        # and touched when the rows first grow, not at every restart (docs/engine.md).
        self._spare: KVCache | None = None
        self._most_rows = 0
        # the cache and spare of the other quantized kind, kept from the last change of kind
        # (`Decoder.use_cheap_cache`): the way back writes into them rather than into fresh
        # memory (three int8 stations' cache and spare, 1.9 GB, took 1.4-1.8 s to allocate and
        # convert into; 0.5 GB more kept once an int4 cache was used)
        self._other_kind: tuple[KVCache, KVCache | None] | None = None
        self._static = StaticStep(decoder, compile) if compile != "none" else None
        # The row layout: per lane, its rows' keys (conditions, and None for the null row) and
        # its first row; the lanes' text rows and cross-attention inputs; all lanes' stacked.
        self._keys: list[tuple[RowKey, ...]] = []
        self._first: list[int] = []
        # per lane: its own rows' keys and cross-attention inputs (warm rows read the same
        # texts: their inputs are these again), and its rows' (warm ones included)
        self._own: list[tuple[tuple[RowKey, ...], CrossKV]] = []
        self._fold_at: dict[int, int] = {}  # lane index -> the step its own inputs fold at
        self._crosses: list[CrossKV] = []
        self._cross: CrossKV | None = None
        self._plain = True  # every lane has one conditional row: logits go to sampling as they are

    def open(
        self,
        prompt: Prompt,
        sampling: SamplingOptions,
        *,
        audio_channels: int,
        keep_frames: int = 1000,
        prompt_frames: torch.Tensor | None = None,
    ) -> Lane:
        """A new stream's lane. Its first window is prefilled before its first step."""
        if len(self.lanes) >= self.size:
            raise ValueError(f"this batch holds {self.size} streams")
        sampling = sampling.validate()
        lane = Lane(
            prompt,
            sampling,
            self.window,
            delays=codebook_delays(self.decoder.num_codebooks, audio_channels),
            guided=self.guided_for(sampling),
            device=self.decoder.device,
            keep_frames=keep_frames,
            prompt_frames=prompt_frames,
            warm=self.window.warm_restarts and self._static is None,
        )
        self.lanes.append(lane)
        return lane

    def guided_for(self, sampling: SamplingOptions) -> bool:
        """Whether a lane with these settings holds a null row: with guidance on, and always in
        a batch of several (sampling takes the same rows from every stream)."""
        return self.size > 1 or sampling.guidance_scale > 1.0

    # -- windows ---------------------------------------------------------------------------

    @torch.inference_mode()
    def restart(self, lane: Lane) -> None:
        """Start a new window for `lane` (after a prompt change, a seed, or a full window):
        positions from 0, its context as the prompt, prefilled (or taken from its warm rows);
        then its next tokens are sampled as after any step."""
        self.follow_cache_kind()
        ids = lane.begin_window()  # [K, C + 1]
        logits = lane.take_warm(ids)
        seconds = None
        self._lay_out(promote=lane if logits is not None else None)
        if logits is None:
            i = self.lanes.index(lane)
            rows = lane.rows.count
            cache = self.cache.rows(self._first[i], rows)
            began = time.perf_counter()
            with barrier_regions():
                logits = self.decoder.prefill(
                    ids.to(self.decoder.device)[None].expand(rows, -1, -1), cache, self._crosses[i]
                )
                self.decoder.wait()
            seconds = time.perf_counter() - began
        # the prefill samples position C + 1 (= ids.shape[1]); the null row follows the others
        null = len(lane.rows.conditions) if lane.rows.guided else None
        group = [(0, lane.weights(ids.shape[1]), null)]
        mixed = logits if lane.rows.plain else mix_rows(logits, group, 1 + lane.rows.guided)
        tokens = sample_streams(mixed, [lane.sampling], [lane.generator], self.decoder.kernels)
        if lane.prefilled(tokens[0].cpu(), seconds):
            self._lay_out()

    # -- steps -----------------------------------------------------------------------------

    def step(self) -> None:
        """One decoder step for every stream (a lane whose window is full, or that has none
        yet, is prefilled first). Call it under `torch.inference_mode()` (`TokenStream` does:
        entering it costs a few Python calls per step)."""
        if len(self.lanes) != self.size:
            raise RuntimeError(f"the batch has {len(self.lanes)} of its {self.size} streams")
        self.follow_cache_kind()
        for lane in self.lanes:
            if lane.needs_window:
                self.restart(lane)
        lanes = self.lanes
        if len(lanes) == 1:
            ids, rows_at = lanes[0].inputs()  # [R, K], R positions
        else:
            inputs = [lane.inputs() for lane in lanes]
            ids = torch.cat([i for i, _ in inputs])
            rows_at = [p for _, at in inputs for p in at]
        ids = ids.to(self.decoder.device)  # (the lanes' tokens live on the CPU)
        samplings = [lane.sampling for lane in lanes]
        generators = [lane.generator for lane in lanes]
        self._fold_due()
        cross = self._stacked_cross()
        if self._static is not None:
            at = torch.tensor(rows_at, device=ids.device)
            # A lane without a null row (guidance dropped) names its first row as null: guidance 1
            # samples its conditional rows alone, as the eager step does (with its own scale a
            # blend's logits were pushed away from its first text's).
            samplings = [
                s if lane.rows.guided else replace(s, guidance_scale=1.0)
                for s, lane in zip(samplings, lanes, strict=True)
            ]
            tokens = self._static(
                ids, at, self.cache, cross, samplings, generators, self._static_mix()
            )
        else:
            logits = self.decoder.decode_one_step(ids, self.cache, cross, rows_at)  # [R, K, V]
            for lane, first in zip(lanes, self._first, strict=True):
                if lane.warm is not None:
                    n = lane.rows.count
                    lane.fed_warm(logits[first + n : first + n + lane.warm_count])
            if not self._plain:
                logits = mix_rows(logits, self._groups(), self._sampled_rows())
            tokens = sample_streams(logits, samplings, generators, self.decoder.kernels)
        tokens = tokens.cpu()  # one copy and one wait for the whole batch, not one a lane
        if len(lanes) == 1:
            changed = lanes[0].stepped(tokens[0])
        else:
            changed = False
            for lane, row in zip(lanes, tokens, strict=True):
                changed |= lane.stepped(row)
        self.steps += 1
        if changed:
            self._lay_out()

    def _sampled_rows(self) -> int:
        """Rows per stream that sampling takes: conditional and null, or the conditional alone
        (a lone stream with guidance off, or every lane's guidance dropped: `drop_guidance`)."""
        return 1 + any(lane.rows.guided for lane in self.lanes)

    def drop_guidance(self, on: bool) -> None:
        """While `on`, no lane holds a null row (`Lane.drop_guidance`: sampled from their
        conditional rows alone, a step's rows halved); they are laid out without them at once,
        every other row keeping its cache. Off, each lane takes its null row back at its next
        window restart (built with its warm rows: nothing is prefilled)."""
        changed = [lane.drop_guidance(on) for lane in self.lanes]
        if any(changed) and self._keys:  # (else the first window lays them out)
            self._lay_out()

    def _groups(self) -> list[tuple[int, list[float], int | None]]:
        """Per lane (first row, its conditional rows' weights for the position this step
        samples, its null row): what `mix_rows` takes."""
        groups = []
        for lane, first in zip(self.lanes, self._first, strict=True):
            n = len(lane.rows.conditions)
            null = first + n if lane.rows.guided else None
            groups.append((first, lane.weights(lane.position + 1), null))
        return groups

    def _static_mix(self) -> Mix:
        """`_groups` as the static step takes them: rows [N, M] and weights [N, M] (M: the most
        conditional rows of a lane, at least 2; a shorter lane's extra entries weigh 0) and null
        rows [N] (a lane without one names its first row: guidance 1 reads only the
        conditional). Plain prompts take one too, so that a transition or a blend is no new
        kind of call for the compiled step, and M is never 1, a size Dynamo would specialize
        (x * 1 + x * 0 is x exactly: the tokens are those of the rows as they are)."""
        groups = self._groups()
        m = max(2, *(len(w) for _, w, _ in groups))
        rows = [[f + min(j, len(w) - 1) for j in range(m)] for f, w, _ in groups]
        weights = [list(w) + [0.0] * (m - len(w)) for _, w, _ in groups]
        nulls = [f if null is None else null for f, _, null in groups]
        device = self.decoder.device
        return Mix(
            torch.tensor(rows, device=device),
            torch.tensor(weights, dtype=torch.float32, device=device),
            torch.tensor(nulls, device=device),
        )

    def prepare_kind(self, kind: str) -> Iterator[None]:
        """Buffers of `kind` ("int8" or "int4") for the next change of kind, which then writes
        into them (`follow_cache_kind`): a cache, and a spare where this batch has one, with
        room for the rows laid out so far, their memory touched a layer of a buffer per step of
        the iterator. Fresh memory is what a change costs (three int8 stations' first change
        to int4 took 1.4 s, nearly all of it allocating), so the radio spreads it between
        chunks ahead of need. Nothing to do when they are there."""
        other = self._other_kind
        if self.cache.kind == kind or (other is not None and other[0].kind == kind):
            return
        rows = max(self._most_rows, self.cache.batch)
        made = [self._untouched(kind, rows) for _ in range(1 if self._spare is None else 2)]
        for cache in made:
            yield from _touch(cache)
        if self.cache.kind != kind:  # (not changed meanwhile)
            self._other_kind = (made[0], made[1] if len(made) > 1 else None)

    def _untouched(self, kind: str, rows: int) -> KVCache:
        """A cache of `kind` shaped as this batch's, with room for `rows` rows, its memory not
        yet touched (`_touch`)."""
        first = self.cache.tensors()[0]
        return KVCache(
            first.shape[0],
            rows,
            first.shape[2],
            self.cache.max_positions,
            self.decoder.head_dim,
            device=self.decoder.device,
            kind=kind,
            touched=False,
        )

    @property
    def spare_missing(self) -> bool:
        """Whether the next layout change (warm rows coming or going) would take a buffer fresh:
        see `prepare_spare`."""
        return self._spare_rows() > 0

    def _spare_rows(self) -> int:
        """Rows the spare must hold for every lane's rows and their warm copies; 0 when it holds
        them already, where no warm rows are laid out (a compiled step's cache), or before the
        batch's first step (its first layout makes both buffers)."""
        if self.steps == 0 or not any(lane.builds_warm for lane in self.lanes):
            return 0
        need = max(self._most_rows, _with_warm([lane.row_keys() for lane in self.lanes]))
        return 0 if self._spare is not None and self._spare.holds(need) else need

    def prepare_spare(self) -> Iterator[None]:
        """The spare buffer the next layout change writes into, made ahead of need with room
        for every lane's rows and their warm copies, in the cache's kind, a layer of a buffer
        per step of the iterator. `_lay_out` makes none once the batch runs when the cache it
        replaced is too small (the rows grew, or a change of kind wrote into new memory): two
        int4 stations' first window restart after the int4 cache was taken laid out both of
        its buffers fresh, 18,000-55,000 page faults, a chunk of 1.7-2.7 s, and they underran.
        Nothing to do when the spare is there."""
        need = self._spare_rows()
        if need == 0:
            return
        spare = self._untouched(self.cache.kind, need)
        yield from _touch(spare)
        if spare.kind == self.cache.kind and self._spare_rows() > 0:  # (not changed meanwhile)
            self._spare = spare
            self._most_rows = max(self._most_rows, need)

    def follow_cache_kind(self) -> None:
        """The cache in the decoder's kind (`Decoder.use_cheap_cache`): converted with every
        position the lanes have written (the positions before the furthest one fed) into the
        buffers of that kind kept from the last change or prepared (`prepare_kind`), with their
        spare; else into new memory of which only what is written is touched now (the rest as
        steps write it), and the next layout change makes a spare. This kind's buffers are
        kept for the way back. `MusicModel.use_cheap_cache` calls it for every batch it
        opened, at the switch; a step or restart after a change, for any other."""
        kind = self.decoder.kv_cache
        if self.cache.kind == kind:
            return
        kernels = self.decoder.kernels
        assert kernels is not None, "a cache changes kind on our CPU kernels only"
        written = max((lane.position for lane in self.lanes), default=0) + 1
        began = time.perf_counter()
        other = self._other_kind
        into, spare = other if other is not None and other[0].kind == kind else (None, None)
        self._other_kind = (self.cache, self._spare)
        self.cache = self.cache.converted(kind, kernels, written, into)
        self._spare = spare if spare is not None and spare.holds(self._most_rows) else None
        log.info(
            "the KV cache is %s now: %d rows of %d positions converted in %.0f ms",
            kind,
            self.cache.batch,
            min(written, self.cache.max_positions),
            1000 * (time.perf_counter() - began),
        )

    # -- the row layout --------------------------------------------------------------------

    def _lay_out(self, promote: Lane | None = None) -> None:
        """Fit the cache and the cross-attention inputs to the lanes' rows now. While every
        lane keeps its number of rows the cache stays as it is (a lane with new texts is about
        to be prefilled); otherwise it is laid out anew: rows that stay keep their cache
        (copied to their new place), new rows start empty (to be prefilled), and the rows of
        `promote` (a window restart that took its warm window) take their warm rows' cache.
        A lane's new texts (a prompt change's: a prefill follows) are folded into its
        cross-attention `FOLD_AFTER_STEPS` steps later; texts it had before (only its null row
        came or went), at once, or at the step their fold was due."""
        keys = [lane.row_keys() for lane in self.lanes]
        changed = [
            i for i, key in enumerate(keys) if i >= len(self._keys) or not _same(key, self._keys[i])
        ]
        if not changed:
            return
        if [len(k) for k in keys] != [len(k) for k in self._keys]:
            sources = self._sources(keys, promote)
            old = self.cache
            if any(lane.builds_warm for lane in self.lanes):
                self._most_rows = max(self._most_rows, _with_warm(keys))
                self.cache = old.select_rows(sources, self._spare, self._most_rows)
                self._spare = old if old.holds(self._most_rows) else None
                if self._spare is None and self.steps == 0:  # (opening: before any music)
                    self._spare = self.cache.select_rows([], capacity=self._most_rows)
                # else the next change's spare is made ahead of it (`prepare_spare`), or by it
            else:  # a compiled step's (GPU) cache: no warm rows, no second buffer
                # (room for a row more than laid out: `engine.static_step.decode_step`)
                self._most_rows = max(self._most_rows, len(sources) + 1)
                self.cache = old.relaid(sources, self._most_rows)
            self._first = [sum(len(k) for k in keys[:i]) for i in range(len(keys))]
        for i in changed:
            lane = self.lanes[i]
            own_keys = tuple(key for key in keys[i] if not key[1])
            if i < len(self._own) and _same(self._own[i][0], own_keys):
                own = self._own[i][1]  # only warm rows came or went
            else:
                states, masks = condition_rows(lane.rows.conditions, lane.rows.guided)
                had = self._own[i][0] if i < len(self._own) else ()
                new = any(all(c is not h for h, _ in had) for c, _ in own_keys if c is not None)
                # texts it had fold at once, or when their pending fold was due
                pending = self._fold_at.pop(i, None)
                due = self.steps + FOLD_AFTER_STEPS if new else pending
                own = self.decoder.cross_kv(states, masks, fold=due is None)  # [R_i, S_i, E] in
                if own.fold_later is not None and due is not None:
                    self._fold_at[i] = due
            cross = self._lane_cross(lane, own)
            if i < len(self._own):
                self._own[i], self._crosses[i] = (own_keys, own), cross
            else:
                self._own.append((own_keys, own))
                self._crosses.append(cross)
        self._keys = keys
        self._cross = None
        # (lanes with and without a null row: sampling takes a pair from each, `mix_rows`)
        self._plain = all(lane.rows.plain and lane.warm is None for lane in self.lanes) and (
            len({lane.rows.guided for lane in self.lanes}) == 1
        )

    def _fold_due(self) -> None:
        """Fold the lanes' new texts into their cross-attention once `FOLD_AFTER_STEPS` steps
        have passed since they were laid out. Counted in steps, so a lane's music is the same
        whenever its reads come (and batched or alone)."""
        for i, at in list(self._fold_at.items()):
            if self.steps < at:
                continue
            del self._fold_at[i]
            keys, own = self._own[i]
            own = self.decoder.fold(own)
            self.folds += 1
            self._own[i], self._crosses[i] = (keys, own), self._lane_cross(self.lanes[i], own)
            self._cross = None

    def _lane_cross(self, lane: Lane, own: CrossKV) -> CrossKV:
        """A lane's rows' cross-attention inputs: its own rows', and its warm rows' after them."""
        return own if lane.warm is None else concat_cross([own, self._warm_cross(lane, own)])

    def _warm_cross(self, lane: Lane, own: CrossKV) -> CrossKV:
        """The cross-attention inputs of `lane`'s warm rows: its own rows' (`own`), and a null
        row after them where the warm rows hold one and its own rows do not (guidance coming
        back: its inputs are zeros, nothing is projected or folded again)."""
        assert lane.warm is not None
        if lane.warm.guided == lane.rows.guided:
            return own
        assert lane.warm.guided, "warm rows without the null row of their lane's own rows"
        states, masks = condition_rows(lane.rows.conditions, True)
        return concat_cross([own, self.decoder.cross_kv(states[-1:], masks[-1:])])

    def _sources(self, keys: list[tuple[RowKey, ...]], promote: Lane | None) -> list[int | None]:
        """For each row of the layout `keys`, its row in the cache now (the same condition, or
        the null row, of the same lane; for `promote`'s rows their warm copies), or None."""
        sources: list[int | None] = []
        for i, key in enumerate(keys):
            old = self._keys[i] if i < len(self._keys) else ()
            start = self._first[i] if i < len(self._first) else 0
            warm = self.lanes[i] is promote
            for condition, is_warm in key:
                want = (condition, is_warm or warm)
                j = next((j for j, o in enumerate(old) if _same_row(o, want)), None)
                sources.append(None if j is None else start + j)
        return sources

    @property
    def cross(self) -> CrossKV:
        """Every row's cross-attention inputs, in row order, as the next step reads them."""
        return self._stacked_cross()

    def _stacked_cross(self) -> CrossKV:
        """Every row's cross-attention inputs, in row order (a lone lane's are its own)."""
        if len(self._crosses) == 1:
            return self._crosses[0]
        if self._cross is None:
            self._cross = concat_cross(self._crosses)
        return self._cross


def _with_warm(keys: list[tuple[RowKey, ...]]) -> int:
    """Rows of the layout `keys` once every lane without warm rows has them: the room the two
    buffers warm rows take turns in need."""
    return sum(len(k) if any(w for _, w in k) else 2 * len(k) for k in keys)


def _touch(cache: KVCache) -> Iterator[None]:
    """Write a cache's memory (zeros) a layer of a buffer per step: its pages faulted in now,
    between a reader's reads, rather than by the step that first needs them."""
    for buffer in cache.tensors():
        for layer in range(buffer.shape[0]):
            buffer[layer].zero_()
            yield


def _same_row(a: RowKey, b: RowKey) -> bool:
    return a[0] is b[0] and a[1] == b[1]


def _same(a: tuple[RowKey, ...], b: tuple[RowKey, ...]) -> bool:
    return len(a) == len(b) and all(_same_row(x, y) for x, y in zip(a, b, strict=True))
