"""Shorter window restarts while generation cannot keep up with real time, and back.

Every `window - context` frames a station's window is full and the engine re-reads the last
`context` frames (`generation.context`, 500 = 10 s) before it goes on: on a CPU that prefill is
seconds of work (4-4.5 s for musicgen-small on two Zen 3 cores, against 20 s of audio made per
window), and it is what tips a machine that steps just fast enough below real time. The ladder
trades some of the music's memory for time: level 0 re-reads the whole context, level 1 half of
it, level 2 a quarter. `choose_level` predicts each level's real-time factor from two
measurements, the steady generation rate (chunks without a prefill) and a whole context's
prefill, and takes the best level that keeps up:

    rtf(level) = new / (new / rate + stations * prefill * share)      new = window - context * share

It moves down a level when the prediction for the current one falls under `DOWN_BELOW`, and up
only when the level above is predicted at `UP_ABOVE` or more, so measurement noise does not make
it flap. Prompt changes keep their own (shorter) `generation.prompt_context`.

With `generation.coarse_when_behind` there is one level more, `COARSE`: the shortest restarts
with int4 projections in place of the int8 ones (`MusicModel.use_coarse`: coarser music, x1.5
the steps per second of musicgen-small on a 2-core AVX2 CPU). Its prediction is the int8 rate
times `coarse_speedup` (a first guess, then int8's cost at the switch over int4's measured in
the `COARSE_SETTLE` chunks after it, once), and while int4 runs, the int8 rate is its rate over
that speedup, so a faster hour climbs back.

With warm restarts (`generation.warm_restarts`, the default) nothing is prefilled: the next
window is built a step at a time during the last `context` frames of the current one, and what
a restart costs is the extra those steps take (measured by the generator on the chunks read
while warm rows were fed). A shorter context shortens that stretch in proportion, so the same
prediction holds with that cost in place of the prefill's. Until it is measured (the first
window's last `context` frames, half a minute in) restarts count as free: a steady rate too slow
for any restarts moves the ladder at once, to the coarse level where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARES = (1.0, 0.5, 0.25)  # share of `generation.context` a window restart re-reads, per level
COARSE = len(SHARES)  # the level after them: the shortest restarts with coarse (int4) weights
COARSE_SPEEDUP = 1.5  # the first guess of coarse weights' speed over int8's (measured, 2 cores)
COARSE_SETTLE = 10  # chunks on coarse weights before their speed is taken and the ladder moves
DOWN_BELOW = 1.02  # a level predicted slower than this is left for the next
UP_ABOVE = 1.15  # the level above is taken back once predicted at least this fast


@dataclass(frozen=True)
class Rates:
    """What the prediction needs, measured by the generator."""

    frames_per_second: float  # frames of audio per station per second of generating, no prefill
    prefill_seconds: (
        float  # a whole context's restart (one station): its prefill or warm rows' extra
    )
    stations: int  # stations generating (each re-prefills once per window)
    # steps per second with coarse weights over int8's; 0: no coarse level
    coarse_speedup: float = 0.0

    @property
    def top(self) -> int:
        """The last level there is."""
        return COARSE if self.coarse_speedup > 0 else len(SHARES) - 1


def context_frames(context: int, level: int) -> int:
    """Frames a window restart re-reads at `level`."""
    return max(1, round(context * SHARES[min(level, len(SHARES) - 1)]))


def predicted_rtf(rates: Rates, window: int, context: int, level: int, frame_rate: float) -> float:
    """Seconds of audio per second of work over a window, with restarts at `level`."""
    reread = context_frames(context, level)
    new = window - reread  # frames made per window
    speedup = rates.coarse_speedup if level == COARSE else 1.0
    prefill = rates.stations * rates.prefill_seconds * reread / context / speedup
    work = new / (rates.frames_per_second * speedup) + prefill
    return (new / frame_rate) / work


def choose_level(level: int, rates: Rates, window: int, context: int, frame_rate: float) -> int:
    """The level to use from now on, starting from `level`."""
    if rates.frames_per_second <= 0 or rates.prefill_seconds <= 0:
        return level  # nothing measured yet

    def rtf(at: int) -> float:
        return predicted_rtf(rates, window, context, at, frame_rate)

    level = min(level, rates.top)
    while level < rates.top and rtf(level) < DOWN_BELOW:
        level += 1
    while level > 0 and rtf(level - 1) >= UP_ABOVE:
        level -= 1
    return level
