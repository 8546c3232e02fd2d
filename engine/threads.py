"""The decoder's thread count, chosen from what the machine gives.

A decode step's threads run it as a team (engine/kernels/team.h): a thread that the scheduler
takes off its core has its work taken over, so beside a busy process two threads still beat one
(x1.17-1.25 of one quiet thread on a 2-core Xeon, the codec included). The rest of a chunk's
work splits with PyTorch's `at::parallel_for` (OpenMP), whose every parallel region ends in a
barrier: the streaming codec, a prefill's products. Beside a busy process one thread is often
descheduled for a whole time slice, and then every such region waits for it: two threads there
ran far slower than one. So that work runs on one thread while the tuner sees the machine shared
(`barrier_regions`), and on every thread otherwise. `ThreadTuner` measures instead of guessing:
it runs each piece of work with the count that has been fastest lately, tries the others now and
then, and keeps per count a smoothed cost per unit of work (seconds per frame). It moves to
another count only when that one measured clearly faster than the current one measured `settle`
times, so noise (or one slow first run) does not make it flap. Work of another size (more
decoder rows a step: a glide, a blend) makes every count dearer, so costs are kept per kind of
work (`measure_for`): counts compare only within one.

On a quiet machine a trial of one thread costs ~1.5x, and where some work still stalls (a step
without our kernels, on PyTorch's ops) a trial of two threads beside a busy process cost 2.5x
the run it replaces (the default OpenMP wait policy spins, so the waiting thread holds the core
its descheduled partner needs: `OMP_WAIT_POLICY=PASSIVE` halves that cliff but costs a quiet
machine up to a tenth of its speed, measured in docs/benchmarks.md). So a trial that clearly
loses makes the next ones wait longer (up to `MAX_BACKOFF` times `explore_every` runs, and at
least until its loss is `TRIAL_SHARE` of the runs in between: on a KVM Xeon two threads beside a
busy process ran at a tenth of one thread's speed; a neighbour that comes makes the current
count's cost jump, and that calls a trial at once), and a prefill, otherwise run on every core,
keeps the current count while the most threads measure as stalling. A count whose runs stall
erratically (each over twice the last or under half: never settled) is left after two runs in a
row that each cost over twice another count's (one alone may be noise), and one whose last two
runs, in whatever kinds of work, each cost over four times another count's (`DEEP_CLIFF`: two
threads beside a busy process on that Xeon cost x2-x15 one thread's); one run at twice is enough
when its threads waited in the run queue for a good share of it (`PREEMPTED`: another process
had the cores, which is not noise).

The first run takes the most threads that the cores other processes run on leave free
(`/proc/stat`'s runnable threads). What a trial will cost is predicted (`trial_cost`) from what
the count cost last, in this kind of work or, scaled, in another, so that a caller can keep a
trial that would empty its buffer for a moment that can afford it. A count's cost measured when
the machine was busier is stale once cores are idle again: the machine's idle time
(`/proc/stat`) while the current count runs says whether a neighbour left; when it did, more
threads are tried soon and predicted as unknown. And a run in progress can be stopped as a stall
(`stalling`, for the work's interrupt: the radio asks it before each decoder step), so that the
chunk a neighbour arrives in does not run on stalling threads to its end (5-8 s for a steady
read on that Xeon before the step's team).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from math import ceil
from typing import TypeVar

import torch

from engine.memory import page_faults

T = TypeVar("T")

CLIFF = 0.5  # a count this much cheaper than the one in use is taken before that one settles
# a trial this much dearer than the count in use clearly loses, and the next waits longer: a
# cliff beside a busy process (2.5x), or one thread on a quiet machine (1.5x a chunk for two
# musicgen-small stations: a trial every 20 chunks cost 2.5% of the throughput)
LOSES = 1.25
MAX_BACKOFF = 4  # trials that keep losing clearly come at most this many times less often
# ... and however much a trial lost, the next waits until it is at most this share of the runs
# in between: beside a busy process two threads ran x0.10 of one thread's speed on a KVM Xeon
# (2026-12-06: 4 s a 10-frame chunk), and a trial of them every 80 runs cost a tenth of the time
TRIAL_SHARE = 0.05
STALLING = 1.5  # the most threads costing this much more than the current count: they stall
# a count this much cheaper than the one in use's last two runs, whatever kinds of work they
# were, is taken at once: a stall beside a busy process (x15) whose runs alternate between kinds
# (short and steady reads) left every kind with one run of it, and bridged for 27 s
DEEP_CLIFF = 0.25
# cores idle while the current count runs, per thread more than it: room for those threads (a
# neighbour left) when the last two runs had at least this much each
ROOM = 0.5
# a run of the current count whose threads waited this share of its wall time in the run queue
# (summed) was preempted by another process: a stall, not noise, from its first run (one int8
# station in `radio serve` on 2 cores: 3-7% quiet, 8-16% on one thread beside a busy process,
# 85-105% on two)
PREEMPTED = 0.25
# a run of the current count is stopped (`stalling`, for the work's interrupt) once it has taken
# this many times what it was expected to, at least STALL_SECONDS, its threads preempted and
# another count predicted at under half its pace: the stalled chunk a neighbour arrives in (a
# 25-frame read 5-8 s on the KVM Xeon) is the radio's last underrun from the tuner
STALL_AFTER = 2.0
STALL_SECONDS = 0.3
# a run in progress says whether its threads are preempted (`preempted_now`) from this long on
MIN_SAY = 0.02


def _task_files(name: str) -> list[str] | None:
    """The contents of `/proc/self/task/*/<name>` for this process's threads alive now (one
    that ends meanwhile is left out); None where the system does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    contents = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/{name}") as f:
                contents.append(f.read())
        except OSError:
            continue
    return contents


def queued_seconds() -> float | None:
    """The time this process's threads have waited in the run queue for a core so far, summed
    over the threads alive now (`/proc/self/task/*/schedstat`); None where the system does not
    say. A run whose threads waited for a good share of its wall time was preempted: another
    process had the cores."""
    stats = _task_files("schedstat")
    if stats is None:
        return None
    total = 0.0
    for stat in stats:
        try:
            total += int(stat.split()[1]) / 1e9
        except (ValueError, IndexError):
            continue
    return total


def cores_taken() -> int | None:
    """How many of the machine's cores other processes are running on now: the median of a
    few readings, 1 ms apart, of the machine's runnable threads (`/proc/stat`'s
    procs_running) less this process's (`/proc/self/task/*/stat`: the caller, and the radio's
    encoders or its event loop at start-up, which come and go); None where the system does not
    say. A busy neighbour reads 1 every time, a quiet machine 0."""
    readings = []
    for i in range(5):
        if i:
            time.sleep(0.001)
        try:
            with open("/proc/stat") as f:
                line = next((ln for ln in f if ln.startswith("procs_running ")), None)
            here = _running_here()
            if line is None or here is None:
                return None
            readings.append(int(line.split()[1]) - here)
        except (OSError, ValueError):
            return None
    return max(sorted(readings)[len(readings) // 2], 0)


def _running_here() -> int | None:
    """This process's threads running or runnable now (state R); None where not said."""
    stats = _task_files("stat")
    return None if stats is None else sum(st[st.rindex(")") + 2 :].startswith("R") for st in stats)


def idle_core_seconds() -> float | None:
    """The machine's idle time so far, summed over its cores (`/proc/stat`: idle and waiting
    for I/O), in seconds; None where the system does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def smooth(old: float | None, new: float, weight: float) -> float:
    """An exponentially smoothed cost: `new` itself first, then `weight` of the way to it."""
    return new if old is None else old + weight * (new - old)


# the running ThreadTuner's `preempted_now`, per thread (the work runs on the tuner's thread)
_running_tuner = threading.local()


@contextlib.contextmanager
def barrier_regions() -> Iterator[None]:
    """Around work whose parallel regions end in a barrier (OpenMP's: the streaming codec, a
    prefill's products): on one thread while the `ThreadTuner` running it sees its threads
    waiting for cores (`PREEMPTED`: another process is busy; two threads there made the codec
    x3 slower than one), on the threads set otherwise."""
    preempted = getattr(_running_tuner, "preempted_now", None)
    threads = torch.get_num_threads()
    if preempted is None or threads == 1 or not preempted():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class ThreadUsage:
    """Where the calling thread's wall time went: on a core, waiting in the run queue for one
    (another process, or our other threads, had the cores), and neither (blocked: the GIL held
    by another thread, a lock, an OpenMP barrier's sleep), with its minor page faults. `now()`
    takes a snapshot, `since(before)` the difference. From `/proc` (Linux's scheduler
    statistics); elsewhere the run queue reads 0 and the thread's CPU time comes from Python."""

    wall: float
    cpu: float
    queued: float
    faults: int

    @classmethod
    def now(cls) -> ThreadUsage:
        wall = time.perf_counter()
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
                on_cpu, queued, _ = f.read().split()
            cpu, waited = int(on_cpu) / 1e9, int(queued) / 1e9
        except (OSError, ValueError):
            cpu, waited = time.thread_time(), 0.0
        return cls(wall, cpu, waited, page_faults())

    def since(self, before: ThreadUsage) -> ThreadUsage:
        return ThreadUsage(
            self.wall - before.wall,
            self.cpu - before.cpu,
            self.queued - before.queued,
            self.faults - before.faults,
        )

    @property
    def blocked(self) -> float:
        return max(self.wall - self.cpu - self.queued, 0.0)

    def describe(self) -> str:
        """`since`'s difference in words."""
        return (
            f"{self.cpu:.3f} s on a core, {self.queued:.3f} s waiting for one, "
            f"{self.blocked:.3f} s blocked, {self.faults} page faults"
        )


def candidate_counts(most: int) -> tuple[int, ...]:
    """Thread counts worth trying on `most` cores: all of them, one fewer, half, one."""
    return tuple(sorted({most, max(1, most - 1), max(1, most // 2), 1}, reverse=True))


class ThreadTuner:
    """Runs work with the intra-op thread count that has been fastest per unit of work.

    `run(work, units)` sets the count (`torch.set_num_threads`, which applies to the calling
    thread's parallel regions), runs `work()`, and records its wall time per unit. It measures
    every count once from the second run on, then every `explore_every` runs tries another
    count once (round robin; up to `MAX_BACKOFF` times less often while trials clearly lose). A run with `explore=False` (the caller cannot afford a slow run
    now, e.g. little audio is buffered) keeps the current count, and a trial it was due for
    waits for the next run that may explore. It switches to the count
    with the lowest smoothed cost when that is at least `margin` cheaper than the current one.
    `most` defaults to PyTorch's thread count at construction (the cores)."""

    def __init__(
        self,
        most: int | None = None,
        *,
        explore_every: int = 20,
        smoothing: float = 0.25,
        margin: float = 0.05,
        settle: int = 3,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        idle: Callable[[], float | None] = idle_core_seconds,
        queued: Callable[[], float | None] = queued_seconds,
        taken: Callable[[], int | None] = cores_taken,
    ) -> None:
        most = most if most is not None else torch.get_num_threads()
        if most < 1:
            raise ValueError(f"most: at least one thread, got {most}")
        if explore_every < 2:
            raise ValueError(f"explore_every: at least 2, got {explore_every}")
        self.counts = candidate_counts(most)
        self.current = self.counts[0]
        self.cost: dict[int, float] = {}  # smoothed seconds per unit, per count tried
        self._samples: dict[int, int] = {}  # runs measured, per count
        self._fresh: dict[int, int] = {}  # of those, runs since its cost last jumped (2x)
        self.settle = settle  # runs of the current count measured before it may be left
        self.key: Hashable = None  # the kind of work measured now (`measure_for`)
        self._other: dict[Hashable, tuple[dict[int, float], dict[int, int], dict[int, int]]] = {}
        # counts measured for any kind: another kind of work waits for the regular trials
        # rather than try every count at once (a glide's first chunk on one thread, and a bridge)
        self._ever: set[int] = set()
        self.explore_every = explore_every
        self.smoothing = smoothing
        self.margin = margin
        self.switches = 0
        self.last = self.current  # the count the latest run used (a trial's, or the current)
        self.last_cost: float | None = None  # its seconds per unit (None: it raised)
        self._clock = clock
        self._set_threads = set_threads
        self._runs = 0
        self._explored = 0
        self._trial_due = False
        self._backoff = 1  # trials come every explore_every * _backoff runs ...
        self._trial_wait = explore_every  # ... or more, after a trial that lost by much
        self._since_trial = 0
        # runs in a row of the current count that each cost over twice the best other count's
        # smoothed cost: two of them leave it, however much its own runs jump about
        self._behind = 0
        self._last_two: list[float] = []  # the current count's last two runs, in any kinds
        # each count's cost over the current count's when the costs were last forgotten
        self._ratios: dict[int, float] = {}
        self._idle = idle
        self._queued = queued
        self._taken = taken
        self._preempted = False  # the latest run's threads waited for cores (`PREEMPTED`)
        self._current_preempted = False  # ... the current count's latest run's
        # the latest run's threads' waits in the run queue, summed, per second of its wall time
        self.last_queued: float | None = None
        # the machine's idle cores during the current count's last two runs (None: not known)
        self._room: list[float | None] = [None, None]
        # the run in progress: (count, began, queued then, expected seconds, units)
        self._running: tuple[int, float, float | None, float | None, float] | None = None
        self.stopped = False  # the latest run was stopped as a stall (`stalling`) ...
        self._stall_to = self.current  # ... for this count

    def run(
        self,
        work: Callable[[], T],
        units: float = 1.0,
        explore: bool = True,
        typical: Callable[[], bool] | None = None,
    ) -> T:
        """`work()` with the chosen count; its time per unit is recorded unless `typical()`,
        asked after it, says the run was not like the others (e.g. it re-prefilled a window:
        seconds of work that one run in a hundred does would make its count look slow), and
        the current count's threads did not wait for cores (`PREEMPTED`: a stall whatever ran)."""
        count = self.last = self._next_count(explore)
        self.last_cost = None
        self._set_threads(count)
        idle, queued = self._idle(), self._queued()  # (read outside the time measured)
        expected = self.current_cost() if count == self.current else None
        self.stopped = False
        began = self._clock()
        self._running = (
            count,
            began,
            queued,
            None if expected is None else expected * units,
            units,
        )
        _running_tuner.preempted_now = self.preempted_now
        try:
            result = work()
        except BaseException:
            if self.stopped:  # a stall stopped: measured at what it cost so far (a floor),
                self.last_cost = (self._clock() - began) / max(units, 1e-9)
                self._preempted = True
                self.record(count, self.last_cost)
                if self.current == count != self._stall_to:  # left for the count predicted
                    self._switch(self._stall_to)
            raise
        finally:
            self._running = None
            _running_tuner.preempted_now = None
        wall = self._clock() - began
        self.last_cost = wall / max(units, 1e-9)
        waited = self._queued()
        self.last_queued = (
            None if queued is None or waited is None or wall <= 0 else (waited - queued) / wall
        )
        self._preempted = self.last_queued is not None and self.last_queued >= PREEMPTED
        if count == self.current:
            after = self._idle()
            room = None if idle is None or after is None or wall <= 0 else (after - idle) / wall
            self._note_room(room)
        # a run not like the others (a prompt's fold ran in it) is left out, unless it stalled
        # (`PREEMPTED`): then its cost is the stall's (the radio's first chunk beside a busy
        # process, with a fold: 3.3 s; left out, the quiet cost stood and took it back there)
        stall = count == self.current and self._preempted
        if typical is None or stall or typical():
            current = self.cost.get(self.current)
            if count != self.current and current is not None:  # a trial: a clear loss backs off
                loses = self.last_cost > LOSES * current
                self._backoff = min(2 * self._backoff, MAX_BACKOFF) if loses else 1
                lost = max(self.last_cost / current - 1.0, 0.0) if loses else 0.0
                self._trial_wait = max(self.explore_every * self._backoff, ceil(lost / TRIAL_SHARE))
            self.record(count, self.last_cost)
        return result

    def preempted_now(self) -> bool:
        """Whether the run in progress has had its threads waiting for cores (`PREEMPTED`) so
        far (`barrier_regions` asks); before it has run long enough to say (`MIN_SAY`
        seconds), or between runs, whether the latest run had."""
        if self._running is None:
            return self._preempted
        _, began, queued, _, _ = self._running
        elapsed = self._clock() - began
        if queued is None or elapsed < MIN_SAY:
            return self._preempted
        return self._waited_for_cores(queued, elapsed)

    def _waited_for_cores(self, queued: float, elapsed: float) -> bool:
        """Whether this process's threads have waited in the run queue `PREEMPTED` of the
        `elapsed` seconds since the run queue's total read `queued`."""
        waited = self._queued()
        return waited is not None and waited - queued >= PREEMPTED * elapsed

    def stalling(self) -> bool:
        """For the work's interrupt, asked now and then while it runs (the radio: before each
        decoder step): whether to stop the run in progress as a stall: a run of the current
        count that has taken STALL_AFTER times its expected time (and STALL_SECONDS), its
        threads waiting for cores (`PREEMPTED`) and another count predicted at under half its
        pace so far (never measured: at its share of the threads). When it says yes, the run's
        error is measured as that stall (`stopped`), the count left for the one predicted, and
        the work goes on from what it made with the next run (not a typical one to measure)."""
        if self._running is None or self.stopped:
            return self.stopped
        count, began, queued, expected, units = self._running
        if count != self.current or expected is None or queued is None:
            return False
        elapsed = self._clock() - began
        if elapsed < max(STALL_AFTER * expected, STALL_SECONDS):
            return False
        if not self._waited_for_cores(queued, elapsed):
            return False
        # (a count never measured here: at its share of the threads, as on a quiet machine,
        # where one thread costs x1.6-1.9 two threads' on these 2-core machines)
        share = expected / units * count
        predicted = {
            c: self.trial_cost(c) or (share / c if c < count else None)
            for c in self.counts
            if c != count
        }
        known = [p for p in predicted.values() if p is not None]
        if not known or min(known) * units >= CLIFF * elapsed:
            return False
        self.stopped = True
        self._stall_to = next(c for c, p in predicted.items() if p == min(known))
        return True

    def _note_room(self, room: float | None) -> None:
        """The machine's idle cores during a run of the current count: when they first show
        room for more threads (`ROOM` per thread, two runs in a row), a neighbour has left, and
        a trial of more threads is due at once (its cost, measured beside it, is stale)."""
        had = self.room_for(self.counts[0])
        self._room = [self._room[1], room]
        if not had and self.room_for(self.counts[0]):
            self._trial_due = True

    def room_for(self, count: int) -> bool:
        """Whether the machine had idle cores for `count` threads in the current count's last
        two runs (on top of those threads): then what `count` cost before is stale."""
        return count > self.current and all(
            r is not None and r >= ROOM * (count - self.current) for r in self._room
        )

    def record(self, count: int, cost: float) -> None:
        """One run's cost per unit with `count` threads; may change the current count."""
        self._ever.add(count)
        old = self.cost.get(count)
        jumped = old is not None and not CLIFF < cost / old < 1 / CLIFF
        if old is not None and jumped:
            self._fresh[count] = 0  # the machine changed (a neighbour came or left): afresh
            if count == self.current and cost > old:  # and the others may be faster now
                self._trial_due = True
            self._stale_elsewhere(count)
        if count == self.current:
            others = [c for k, c in self.cost.items() if k != count]
            self._behind = self._behind + 1 if others and cost * CLIFF > min(others) else 0
            self._note_current(cost)
        self._samples[count] = self._samples.get(count, 0) + 1
        n = self._fresh[count] = self._fresh.get(count, 0) + 1
        # the plain mean of the first runs (one slow first run must not linger), then smoothed
        self.cost[count] = smooth(self.cost.get(count), cost, max(self.smoothing, 1 / n))
        if self._stalled():
            return
        best = min(self.cost, key=self.cost.__getitem__)
        current = self.cost.get(self.current)
        if best == self.current or current is None:  # (a new kind's first run: a trial's)
            return
        # a clear win once the current count's cost is settled; after two runs already when it
        # halves the cost (a busy neighbour's cliff is not noise, and every run on it costs
        # double; one slow first run alone is not enough)
        runs = self._fresh[self.current]  # (since its cost last jumped)
        if (
            (runs >= self.settle and self.cost[best] < (1 - self.margin) * current)
            or (runs >= 2 and self.cost[best] < CLIFF * current)
            or self._behind >= 2  # (a stalling count's runs jump by 2x and more: never fresh)
        ):
            self._switch(best)

    def _stale_elsewhere(self, count: int) -> None:
        """`count`'s costs in the other kinds of work are stale (the machine changed): one
        measured before a neighbour came (two threads fast) took a kind back to two threads."""
        for kept in self._other.values():
            for measured in kept:
                measured.pop(count, None)
        self._ratios.pop(count, None)

    def _note_current(self, cost: float) -> None:
        """A run of the current count cost `cost` per unit (for `_stalled`)."""
        self._last_two = [*self._last_two[-1:], cost]
        self._current_preempted = self._preempted
        if self._preempted:
            self._stale_elsewhere(self.current)

    def _stalled(self) -> bool:
        """Leave the current count at once when its last two runs, of any kinds of work (a
        stall does not wait for each kind's second), each cost over 1 / DEEP_CLIFF times what
        another count is predicted to cost (`trial_cost`), or its last run alone cost over
        1 / CLIFF times that with its threads waiting for cores (`PREEMPTED`: another process
        had them, which is no noise); whether it did."""
        if not self._last_two:
            return False
        predicted = {c: self.trial_cost(c) for c in self.counts if c != self.current}
        known = {c: cost for c, cost in predicted.items() if cost is not None}
        if not known:
            return False
        best = min(known, key=known.__getitem__)
        if (self._current_preempted and known[best] < CLIFF * self._last_two[-1]) or (
            len(self._last_two) == 2 and all(known[best] < DEEP_CLIFF * c for c in self._last_two)
        ):
            self._switch(best)
            return True
        return False

    def _switch(self, count: int) -> None:
        self.current = count
        self.switches += 1
        self._behind = 0
        self._room = [None, None]  # (measured with the count left)
        self._last_two = []
        self._current_preempted = False
        self._trial_due = False  # (a jump of the count just left called one: this was it)

    def use_current(self) -> None:
        """Set the current count for work run outside `run` (a prompt change's prefill): the
        count the last run set may be a trial's (one thread: a prefill twice as long)."""
        self._set_threads(self.current)

    def use_most(self) -> None:
        """Set the most threads for work run outside `run` that is bound by the maths rather
        than by memory (a prompt change's prefill: big matrix products, which two cores finish
        in 0.57 of one's time here even when decode steps run as fast on one), unless they
        measured as stalling on each other (a busy neighbour: `STALLING`): then the current."""
        most, current = self.cost.get(self.counts[0]), self.cost.get(self.current)
        stalling = most is not None and current is not None and most > STALLING * current
        self._set_threads(self.current if stalling else self.counts[0])

    def _measured(self, key: Hashable) -> tuple[dict[int, float], dict[int, int], dict[int, int]]:
        """(costs, runs, fresh runs) per count of kind `key`: the current kind's or a kept one."""
        if key == self.key:
            return self.cost, self._samples, self._fresh
        return self._other.get(key, ({}, {}, {}))

    def costs_of(self, key: Hashable) -> dict[int, float]:
        """The smoothed cost per unit of each count measured for work of kind `key`."""
        return self._measured(key)[0]

    @property
    def settled(self) -> bool:
        """Whether the current count's cost was measured `settle` times for this kind of work."""
        return self._samples.get(self.current, 0) >= self.settle

    def measure_for(self, key: Hashable) -> None:
        """Runs from now on are work of kind `key` (the generator: decoder rows a step): the
        costs measured for it before come back, a kind not seen yet starts afresh, its other
        counts measured at the regular trials. The current count stays."""
        if key == self.key:
            return
        self._other[self.key] = (self.cost, self._samples, self._fresh)
        self.cost, self._samples, self._fresh = self._other.pop(key, ({}, {}, {}))
        self.key = key
        self._behind = 0

    def forget(self) -> None:
        """Drop every cost measured (the work changed speed: other weights); each count is
        measured once again from the next run. How the counts compared is kept to predict
        their trials (`trial_cost`): two threads that stalled beside a busy process on int8
        weights were tried at once on int4 ones, unknown, and stalled for 2 s."""
        measured: dict[int, float] = {}  # (the dearest of the kinds where both ran)
        for costs, _, _ in [(self.cost, None, None), *self._other.values()]:
            here = costs.get(self.current)
            for c, v in costs.items():
                if here:
                    measured[c] = max(measured.get(c, 0.0), v / here)
        self._ratios = {**self._ratios, **measured}
        self.cost, self._samples, self._fresh, self._other, self._ever = {}, {}, {}, {}, set()

    def next_trial(self) -> int | None:
        """The count the next run would try if it may explore (None: it would keep the current
        one): a count not measured yet, or the next in turn once a trial is due."""
        others, untried = self._candidates()
        if untried and self._runs >= 1:
            return untried[0]
        due = self._trial_due or self._since_trial + 1 >= self._trial_wait
        if not due or not others:
            return None
        return others[(self._explored + 1) % len(others)]

    def current_cost(self) -> float | None:
        """What a run of the current count is expected to cost per unit of this kind of work:
        its smoothed cost here, else its latest run's in another kind (None: never run); the
        latest's when that one's threads waited for cores (`PREEMPTED`) and cost more."""
        here = self.cost.get(self.current)
        latest = self._last_two[-1] if self._last_two else None
        if latest is not None and self._current_preempted:  # (a stall now: the latest says)
            return max(here or 0.0, latest)
        return here if here is not None else latest

    def trial_cost(self, count: int) -> float | None:
        """What a run of `count` threads is predicted to cost per unit of this kind of work:
        its cost measured here, or in another kind scaled by the current count's costs there
        and here (a short read costs more per frame than a long one with every count); None
        when it was never measured, or the machine has had room for it since (`room_for`)."""
        if self.room_for(count):
            return None
        if count in self.cost:
            return self.cost[count]
        here = self.cost.get(self.current)
        guesses = [
            costs[count] * (here / costs[self.current] if here and costs.get(self.current) else 1)
            for costs, _, _ in self._other.values()
            if count in costs
        ]
        if guesses:
            return max(guesses)
        current = self.current_cost()
        if count in self._ratios and current is not None:  # (from before other weights)
            return self._ratios[count] * current
        return None

    def _candidates(self) -> tuple[list[int], list[int]]:
        """The counts a trial may take (and of those, the ones never measured): every one but
        the current (beside a busy process, more threads than its cores leave free win since
        the step's threads run as a team: x1.2-1.3)."""
        others = [c for c in self.counts if c != self.current]
        return others, [c for c in others if c not in self._ever]

    def _first_count(self) -> int:
        """The count of the first run: the most that the cores other processes are running on
        now leave free (beside a busy process two threads on a KVM Xeon made the first chunk
        in 5.9 s, one thread in 0.4), all of them where the system does not say."""
        taken = self._taken()
        if not taken:
            return self.counts[0]
        free = min(self.counts[0], (os.cpu_count() or self.counts[0]) - taken)
        return next((c for c in self.counts if c <= free), self.counts[-1])

    def _next_count(self, explore: bool) -> int:
        self._runs += 1
        if self._runs == 1:
            self.current = self._first_count()
        others, untried = self._candidates()
        self._since_trial += 1
        self._trial_due |= self._since_trial >= self._trial_wait
        if not explore:
            return self.current
        if untried and self._runs > 1:  # each count measured once from the start
            return untried[0]
        if not self._trial_due or not others:  # (one core: nothing to try)
            return self.current
        self._trial_due = False
        self._since_trial = 0
        self._explored += 1
        return others[self._explored % len(others)]

    def describe(self) -> str:
        costs = ", ".join(f"{c}: {self.cost[c] * 1000:.1f} ms" for c in sorted(self.cost))
        return f"{self.current} thread(s) (cost per unit {costs or 'not measured yet'})"
