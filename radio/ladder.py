"""Shorter window restarts, then shorter windows, while generation cannot keep up with real
time, and back.

Every `window - context` frames a station's window is full and the engine re-reads the last
`context` frames (`generation.context`, 500 = 10 s) before it goes on: on a CPU that prefill is
seconds of work (4-4.5 s for musicgen-small on two Zen 3 cores, against 20 s of audio made per
window), and it is what tips a machine that steps just fast enough below real time. The ladder
trades some of the music's memory for time. Level 0 re-reads the whole context with the KV
cache as set. Where that cache is int8 on our CPU kernels, level 1 (`CHEAP_CACHE`) keeps the
whole context and takes an int4 cache in place of it (`MusicModel.use_cheap_cache`: half the
bytes a step's attention reads, 3.0% of the logit spread against 2.2%, within the precision
budget: gentler on the music than forgetting), and every level after it keeps that cache.
Level 2 re-reads half the context, level 3 a quarter; past those, levels 4 and 5 keep the
quarter and end each window early, at two thirds and at half of `window` (20 s and 15 s of
musicgen-small's 30): a step attends over every position of its window so far, and on a CPU
those reads grow to a third of a step near a window's end (two int4 stations: x1.38 of real
time early in a window, x0.96 at its end).
`choose_level` predicts each level's real-time factor from what the generator measured, the
steady generation rate (chunks without a prefill) at the positions it ran at, how that cost grows
with the position (`PositionCost`), and a whole context's prefill, and takes the best level that
keeps up:

    rtf(level) = new / (new * stations * cost(mean) + stations * prefill * share)
    new = span - context * share    mean = (context * share + span) / 2

(`span` the positions a window spans at that level, `cost(mean)` a frame's cost per station at
the window's mean position). It moves down a level when the prediction for the current one
falls under `DOWN_BELOW`, and up only when the level above is predicted at `UP_ABOVE` or more,
so measurement noise does not make it flap. The int4 cache, within the precision budget, is
taken sooner: below `MARGIN` (x1.3) with the int8 one, and left at `MARGIN_BACK`. The window
levels are there only once their gain is measured (a cost that grows with the position); prompt
changes keep their own (shorter) `generation.prompt_context`.

With `generation.coarse_when_behind` there are two levels more: the shortest restarts and
windows with int4 projections in place of the int8 ones in the last half of the decoder's
layers (`COARSE`), then in all of them (`COARSEST`) (`MusicModel.use_coarse`: coarser music,
7.9% and 15.8% of the spread against int8's 3.0% on the int4 cache; all of them x1.3-1.5 the
steps per second of musicgen-small on a 2-core AVX2 CPU, the last half most of that: the last
layers' rounding moves the logits least). A rung's prediction is the int8 rate times its
speedups (`cache_speedup`, `coarse_speedup`: all layers int4, a share of them the bytes'
share of it, `share_speedup`; first guesses, then the cost at the switch over the cost
measured in the `SETTLE` chunks after it), and while a rung runs, the int8 rate is its rate
over those speedups, so a faster hour climbs back.

With `generation.drop_guidance_when_behind` as well, one level more after those: guidance off
(`UNGUIDED`, `MusicModel.drop_guidance`): no null rows, so a step has half the rows, each
station sampled from its conditional rows alone (music that follows its prompt less closely,
the prompt still heard); on every layer's int4 weights the steps are bound by the vector ALUs,
not the bytes, and two stations on 2 Zen 3 cores ran x1.3 faster without them
(`guidance_speedup`). The null rows come back at each station's next window restart, built
with its warm rows.

With warm restarts (`generation.warm_restarts`, the default) nothing is prefilled: the next
window is built a step at a time during the last `context` frames of the current one, and what
a restart costs is the extra those steps take (measured by the generator on the chunks read
while warm rows were fed). A shorter context shortens that stretch in proportion, so the same
prediction holds with that cost in place of the prefill's. Until it is measured (the first
window's last `context` frames, half a minute in) restarts count as free: a steady rate too slow
for any restarts moves the ladder at once, to the coarse level where there is one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.options import MIN_NEW_FRAMES  # (past twice the restarts' context here: warm rows)

# per level: the share of `generation.context` a window restart re-reads, and the share of
# `window` a window spans. Level 1 (`CHEAP_CACHE`) is level 0 with an int4 KV cache in place
# of the int8 one, and every level after it keeps that cache where the model has one.
LEVELS = ((1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (0.25, 2 / 3), (0.25, 0.5))
CHEAP_CACHE = 1
SHORTEST_RESTARTS = 3  # the last level with whole windows
COARSE = len(LEVELS)  # the shortest restarts and windows, int4 weights in the last half
COARSEST = COARSE + 1  # ... and in every layer (and the lm heads)
UNGUIDED = COARSEST + 1  # ... and guidance off: no null rows, half the rows a step
COARSE_SHARES = {COARSE: 0.5, COARSEST: 1.0, UNGUIDED: 1.0}  # the share of layers int4
CACHE_SPEEDUP = 1.1  # the first guess of the int4 cache's speed over int8's (1.07-1.5 measured)
# the first guess of int4 weights' speed over int8's, until measured on the rung: the least of
# what was measured on 2 cores (one station on Zen 3 x1.3-1.5; two on the Xeon x1.28-1.32,
# `bench/timeline.py --stations 2 --mode int4-kv4` against `int8-kv4`). With x1.5 two Xeon
# stations took half the layers int4 on a predicted x1.18, ran at x0.87-0.97 over the 19 s until
# the rung's speed was measured, and bridged 1.8 s (2026-12-07 09:17)
COARSE_SPEEDUP = 1.3
# the first guess of the steps' speed without null rows over with them, on every layer's int4
# weights: two musicgen-small stations on 2 Zen 3 cores x1.30 (the vector ALUs, not the bytes,
# bound those steps: half the rows, not half the time)
GUIDANCE_SPEEDUP = 1.3
# chunks on a rung before its speed is taken and the ladder moves (the generator moves after the
# three its rate is the median of when they run under real time already: `Generator._move`)
SETTLE = 10
# seconds a rung taken is kept before the ladder climbs off it: each way costs a switch (tens
# of milliseconds, int4 weights' first a second or two) and a speed measured afresh, and three
# int8 stations flapped between the int8 and int4 caches every 6-10 s near x1.0
RUNG_SECONDS = 30.0
DOWN_BELOW = 1.02  # a level predicted slower than this is left for the next
# ... but half the layers int4 (`COARSE`) is taken and kept only at `UP_ABOVE`: a prompt change
# throws the audio after its cut away, which the buffer refills at the margin, and on it two
# Zen 3 cores ran at x1.02-1.23, a change once heard after 1.72 s (on all layers int4, x1.5:
# under 1 s); below that margin the ladder takes every layer's int4 weights, and from them it
# climbs back to int8 weights, not to half of them: its predictions at a window's start (a
# prompt change's) run ahead of the window's mean until the cost's slope with the position is
# measured, and runs took turns between half and all every 20-40 s on them (x1.17 predicted,
# x1.14 measured), whatever the bar (x1.15, x1.3). The half comes only on the way down
UP_ABOVE = 1.15  # the level above is taken back once predicted at least this fast
CLEARLY = 1.03  # where no level keeps up, a later one is taken if predicted this much faster
# The int4 KV cache stays within the precision budget (2.9% of the logit spread against int8's
# 2.2%), so it is taken to keep a margin, not only to keep up: when the int8 cache is predicted
# under x1.3 of real time (issue 15's margin: a slow minute of the machine, the next prompt
# change's cut), and left once that is predicted at x1.45 again. The rungs after it cost the
# music more (a shorter memory, int4 weights) and wait for `DOWN_BELOW`.
MARGIN = 1.3
MARGIN_BACK = 1.45


@dataclass(frozen=True)
class Rates:
    """What the prediction needs, measured by the generator."""

    frames_per_second: float  # frames of audio per station per second of generating, no prefill
    prefill_seconds: (
        float  # a whole context's restart (one station): its prefill or warm rows' extra
    )
    stations: int  # stations generating (each re-prefills once per window)
    # steps per second with int4 weights in every layer over int8's; 0: no coarse levels
    coarse_speedup: float = 0.0
    # how a frame's cost per station (seconds) grows per position of the steps' mean position,
    # and the mean position `frames_per_second` was measured at; 0: not measured (the window
    # levels are left out: shorter windows would only restart more often)
    slope: float = 0.0
    position: float = 0.0
    # steps per second with an int4 KV cache over the int8 one; 0: no cheaper-cache level
    cache_speedup: float = 0.0
    # until `slope` is measured: its guess from the bytes a step reads (the KV cache grows with
    # the position, the weights do not: `Generator._prior_slope`), for the cost at a window's
    # positions only (the window levels still wait for a measured slope); 0: none
    prior_slope: float = 0.0
    # steps per second without null rows over with them (guidance dropped, on every layer's
    # int4 weights); 0: no unguided level
    guidance_speedup: float = 0.0
    # whether the stations run shortened windows now (`windows_pay` keeps them within a band)
    short_windows: bool = False

    @property
    def levels(self) -> list[int]:
        """The levels there are, in order."""
        levels = [0, CHEAP_CACHE] if self.cache_speedup > 0 else [0]
        levels += list(range(CHEAP_CACHE + 1, SHORTEST_RESTARTS + 1))
        if self.slope > 0:
            levels += list(range(SHORTEST_RESTARTS + 1, len(LEVELS)))
        if self.coarse_speedup <= 0:
            return levels
        return levels + [COARSE, COARSEST] + ([UNGUIDED] if self.guidance_speedup > 0 else [])

    def speedup(self, level: int) -> float:
        """Steps per second at `level` over those with int8 weights and cache: the int4 cache's
        from `CHEAP_CACHE` on (where there is one), the coarse weights' on top from `COARSE`,
        and no null rows' at `UNGUIDED`."""
        cache = self.cache_speedup if self.cache_speedup > 0 and level >= CHEAP_CACHE else 1.0
        guidance = self.guidance_speedup if level >= UNGUIDED else 1.0
        return cache * share_speedup(self.coarse_speedup, coarse_share(level)) * guidance

    @property
    def top(self) -> int:
        """The last level there is."""
        return self.levels[-1]

    @property
    def shortest(self) -> int:
        """The last level on int8 weights: the shortest restarts and windows there are."""
        return [level for level in self.levels if level < COARSE][-1]


def coarse_share(level: int) -> float:
    """The share of the decoder's layers on int4 weights at `level` (0 before `COARSE`)."""
    return COARSE_SHARES.get(level, 0.0)


def share_speedup(speedup: float, share: float) -> float:
    """Steps per second with int4 weights in `share` of the layers over int8's, from the speedup
    with all of them (`speedup`, 0: none): the weights a step reads shrink by the share, so the
    step's time by the share of what all of them save."""
    if share <= 0 or speedup <= 0:
        return 1.0
    return 1.0 / (1.0 - share * (1.0 - 1.0 / speedup))


def full_speedup(measured: float, share: float) -> float:
    """The speedup with all layers int4 that `measured` with `share` of them implies (the
    inverse of `share_speedup`)."""
    saved = (1.0 - 1.0 / measured) / share
    return 1.0 / max(1.0 - saved, 1e-3)


def context_frames(context: int, level: int) -> int:
    """Frames a window restart re-reads at `level`."""
    return max(1, round(context * LEVELS[min(level, len(LEVELS) - 1)][0]))


def window_frames(window: int, context: int, level: int, windows: bool = True) -> int:
    """Positions a window spans at `level`: still room for its restarts' warm rows and a
    second of new music beyond them. `windows`: whether the coarse levels take the last window
    level's windows (`windows_pay`), else whole ones."""
    if level >= COARSE:
        level = len(LEVELS) - 1 if windows else SHORTEST_RESTARTS
    share = LEVELS[level][1]
    if share >= 1.0:
        return window
    reread = context_frames(context, level)
    return min(window, max(round(window * share), 2 * reread + MIN_NEW_FRAMES))


def windows_pay(rates: Rates, window: int, context: int) -> bool:
    """Whether the coarse levels take the last window level's windows: with a measured slope
    for which those are predicted `CLEARLY` faster than whole windows (both with the shortest
    restarts), and kept until whole ones are predicted `CLEARLY` faster (`short_windows`), not
    with any slope at all. A slope near 0, fitted just above it one chunk and not the next,
    made a station on int4 weights take 15 s windows where 30 s ones were predicted faster
    (x1.31 against x1.33), and flip between the two every half second; without the band, a
    slope of 20% per 10 s flipped them every few seconds as the rate moved after prompt
    changes."""
    if rates.slope <= 0:
        return False
    short = predicted_rtf(rates, window, context, len(LEVELS) - 1, 1.0)
    whole = predicted_rtf(rates, window, context, SHORTEST_RESTARTS, 1.0)
    return short * CLEARLY >= whole if rates.short_windows else short >= CLEARLY * whole


def predicted_rtf(rates: Rates, window: int, context: int, level: int, frame_rate: float) -> float:
    """Seconds of audio per second of work over a window, with restarts at `level`."""
    reread = context_frames(context, level)
    windows = level >= COARSE and windows_pay(rates, window, context)
    span = window_frames(window, context, level, windows)
    new = span - reread  # frames made per window
    speedup = rates.speedup(level)
    measured = 1.0 / (rates.frames_per_second * rates.stations)  # a frame's cost per station
    slope = rates.slope if rates.slope > 0 else rates.prior_slope
    shift = slope * ((reread + span) / 2 - rates.position) if slope > 0 else 0.0
    cost = max(measured + shift, 0.1 * measured)
    prefill = rates.stations * rates.prefill_seconds * reread / context
    work = (new * rates.stations * cost + prefill) / speedup
    return (new / frame_rate) / work


class PositionCost:
    """How a typical chunk's cost per frame grows with the positions its steps attend over: a
    line through the chunks' (mean position, cost) with weights that fade (`FADE` a chunk: the
    last minute or so, a few windows). The slope is believed
    once the positions spread over most of a window (`MIN_SPREAD`), and kept while they spread
    less (the start of a window after a prompt change): the window levels must not come and
    go with where the windows happen to be."""

    FADE = 0.005
    MIN_CHUNKS = 20
    MIN_SPREAD = 300.0  # frames: the positions' standard deviation (uniform over 125..1500: 397)

    def __init__(self) -> None:
        self.chunks = 0
        self._x = self._y = self._xx = self._xy = 0.0
        self._slope = 0.0

    def add(self, position: float, cost: float) -> None:
        self.chunks += 1
        fade = max(self.FADE, 1 / self.chunks)  # the plain mean of the first chunks
        self._x += fade * (position - self._x)
        self._y += fade * (cost - self._y)
        self._xx += fade * (position * position - self._xx)
        self._xy += fade * (position * cost - self._xy)
        variance = self._xx - self._x * self._x
        if self.chunks >= self.MIN_CHUNKS and variance >= self.MIN_SPREAD**2:
            self._slope = max(0.0, (self._xy - self._x * self._y) / variance)

    @property
    def slope(self) -> float:
        """Seconds per frame per position: 0 until the positions spread enough, never negative
        (a busier minute at the windows' start is not a cheaper end)."""
        return self._slope


def choose_level(level: int, rates: Rates, window: int, context: int, frame_rate: float) -> int:
    """The level to use from now on, starting from `level`."""
    if rates.frames_per_second <= 0 or rates.prefill_seconds <= 0:
        return level  # nothing measured yet

    def rtf(at: int) -> float:
        return predicted_rtf(rates, window, context, at, frame_rate)

    def keeps_up(at: int) -> bool:
        return rtf(at) >= (UP_ABOVE if at == COARSE else DOWN_BELOW)

    levels = rates.levels
    i = max(j for j, at in enumerate(levels) if at <= level)  # (a level gone: the one before)
    if not keeps_up(levels[i]):
        # the first level after it that keeps up, else the fastest if clearly faster
        later = levels[i:]
        keeping = [at for at in later if keeps_up(at)]
        fastest = max(later, key=rtf)
        if keeping:
            i = levels.index(keeping[0])
        elif rtf(fastest) >= CLEARLY * rtf(levels[i]):
            i = levels.index(fastest)

    while i > 0:
        j = i - 1
        if levels[i] == COARSEST and levels[j] == COARSE:
            j -= 1  # from every layer's int4 weights back to int8's, never to half of them
        if rtf(levels[j]) < (MARGIN_BACK if levels[i] == CHEAP_CACHE else UP_ABOVE):
            break
        i = j
    if levels[i] == 0 and CHEAP_CACHE in levels and rtf(0) < MARGIN and rtf(CHEAP_CACHE) > rtf(0):
        i = levels.index(CHEAP_CACHE)  # the margin, within the precision budget
    return levels[i]


SUSTAIN_SECONDS = 60.0  # seconds of generating `Sustained` measures over
SUSTAIN_AT_LEAST = 10.0  # ... and the least it needs to say anything


class Sustained:
    """Audio per second of generating over its last `SUSTAIN_SECONDS`: window restarts, warm
    rows, thread trials and slow moments all fall within a minute (two int4 stations' factor
    swings x0.6-1.6 from one 5 s sample to the next, and the ladder's prediction moved x1.0-1.4
    as it changed levels). `rtf` is 0 before `SUSTAIN_AT_LEAST` seconds of it."""

    def __init__(self) -> None:
        self._reads: deque[tuple[float, float]] = deque()  # (audio seconds, seconds spent)
        self._audio = self._spent = 0.0

    def add(self, audio: float, spent: float) -> None:
        self._reads.append((audio, spent))
        self._audio += audio
        self._spent += spent
        while self._spent - self._reads[0][1] >= SUSTAIN_SECONDS:
            old_audio, old_spent = self._reads.popleft()
            self._audio -= old_audio
            self._spent -= old_spent

    @property
    def rtf(self) -> float:
        return self._audio / self._spent if self._spent >= SUSTAIN_AT_LEAST else 0.0
