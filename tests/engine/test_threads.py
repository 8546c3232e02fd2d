"""ThreadTuner: picks the thread count that runs fastest, tries the others now and then, and
follows the machine when that changes (a fake clock: each count's cost is set by the test);
ThreadUsage: where a thread's wall time went (real threads)."""

import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.threads import (
    MAX_BACKOFF,
    TRIAL_SHARE,
    ThreadTuner,
    ThreadUsage,
    barrier_regions,
    candidate_counts,
    cores_taken,
    idle_core_seconds,
    queued_seconds,
)


class FakeMachine:
    """Work whose wall time per unit depends on the thread count set before it runs; while it
    runs the machine has `idle` cores idle (None: the system does not say), the work's threads
    wait `queued[threads]` s in the run queue per second (another process has the cores), and
    other processes run on `taken` cores (None: not said)."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost = cost
        self.now = 0.0
        self.threads = 0
        self.ran: list[int] = []
        self.idle: float | None = None
        self.queued: dict[int, float] = {}
        self.taken: int | None = None
        self.idle_seconds = 0.0
        self.queued_seconds = 0.0

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n

    def work(self, units: int = 10) -> int:
        wall = self.cost[self.threads] * units
        self.now += wall
        self.idle_seconds += (self.idle or 0.0) * wall
        self.queued_seconds += self.queued.get(self.threads, 0.0) * wall
        self.ran.append(self.threads)
        return self.threads


def tuner(machine: FakeMachine, most: int = 2, **kw) -> ThreadTuner:
    return ThreadTuner(
        most,
        clock=machine.clock,
        set_threads=machine.set_threads,
        idle=lambda: None if machine.idle is None else machine.idle_seconds,
        queued=lambda: machine.queued_seconds,
        taken=lambda: machine.taken,
        **kw,
    )


def test_candidate_counts():
    assert candidate_counts(1) == (1,)
    assert candidate_counts(2) == (2, 1)
    assert candidate_counts(8) == (8, 7, 4, 1)


def test_quiet_machine_keeps_all_cores_and_only_explores_rarely():
    """One thread costs 1.8x two on a quiet machine: tried at the second run, then ever more
    rarely (each clear loss doubles the wait, up to MAX_BACKOFF x explore_every runs)."""
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine, explore_every=20)
    for _ in range(400):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2 and t.switches == 0
    trials = [i for i, n in enumerate(machine.ran) if n == 1]
    gaps = [b - a for a, b in zip(trials, trials[1:], strict=False)]
    assert trials[0] == 1 and 20 < gaps[0] < 20 * MAX_BACKOFF, gaps
    assert set(gaps[1:]) == {20 * MAX_BACKOFF} and len(gaps) >= 3, gaps
    assert t.cost[2] == pytest.approx(0.010) and t.cost[1] == pytest.approx(0.018)
    machine.cost = {2: 0.010, 1: 0.011}  # close: trials every 20 runs again
    ran = len(machine.ran)
    for _ in range(20 * MAX_BACKOFF + 50):
        t.run(lambda: machine.work(10), units=10)
    trials = [i for i, n in enumerate(machine.ran[ran:]) if n == 1]
    assert [b - a for a, b in zip(trials, trials[1:], strict=False)][-2:] == [20, 20]


def test_no_trial_while_the_caller_cannot_afford_one_and_the_trial_waits_for_it():
    machine = FakeMachine({2: 0.010, 1: 0.011})  # a trial of the other count: a little slower
    t = tuner(machine, explore_every=20)
    t.run(lambda: machine.work(10), units=10)
    t.run(lambda: machine.work(10), units=10)  # the first measurement of 1 thread
    assert machine.ran == [2, 1] and t.last == 1 and t.current == 2  # `last`: a trial's count
    for i in range(3, 60):  # runs 20-29 and 40-49 must not explore (little audio ahead)
        t.run(lambda: machine.work(10), units=10, explore=not (20 <= i < 30 or 40 <= i < 50))
    assert machine.ran[2:].count(1) == 2  # the trials due at runs 20 and 40 ...
    assert machine.ran[30 - 1] == 1 and machine.ran[50 - 1] == 1  # ... came at runs 30 and 50
    assert t.current == 2


def test_an_untypical_run_is_not_measured():
    """A run that re-prefilled a window takes seconds: it must not make its count look slow."""
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine, explore_every=20)
    for _ in range(3):  # both counts measured, 2 in use
        t.run(lambda: machine.work(10), units=10)
    machine.cost[2] = 1.0  # this run does a hundred times the work
    t.run(lambda: machine.work(10), units=10, typical=lambda: False)
    assert machine.ran[-1] == 2 and t.cost[2] == pytest.approx(0.010)
    t.run(lambda: machine.work(10), units=10)  # the same run, measured: 2 looks slow ...
    assert t.current == 2  # (once could be noise: it tries the other count at once)
    t.run(lambda: machine.work(10), units=10)
    assert machine.ran[-1] == 1 and t.current == 2
    t.run(lambda: machine.work(10), units=10)
    assert t.current == 1  # ... twice is the machine


def test_a_busy_neighbour_moves_it_to_one_thread_and_back_when_it_leaves():
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine, explore_every=10)
    for _ in range(50):
        t.run(lambda: machine.work(10), units=10)
    machine.cost = {2: 0.060, 1: 0.020}  # a busy process: two threads stall on each other
    runs = 0
    while t.current == 2:
        t.run(lambda: machine.work(10), units=10)
        runs += 1
    assert runs <= 25, "it should notice within a few explorations"
    assert t.current == 1
    for _ in range(30):
        t.run(lambda: machine.work(10), units=10)
    assert machine.ran[-30:].count(1) >= 27
    machine.cost = {2: 0.010, 1: 0.018}  # quiet again
    runs = 0
    while t.current == 1:
        t.run(lambda: machine.work(10), units=10)
        runs += 1
    assert runs <= 60
    assert t.switches == 2


def test_noise_within_the_margin_does_not_flap():
    machine = FakeMachine({2: 0.0100, 1: 0.0102})
    t = tuner(machine, explore_every=5, margin=0.05)
    for _ in range(100):
        t.run(lambda: machine.work(10), units=10)
    assert t.switches == 0


def test_one_slow_first_run_does_not_hand_the_work_to_a_slower_count():
    """The current count is left only once measured `settle` times: a first run that happened
    to be slow (a glide's first chunk) against a one-thread trial once flipped it, and bridged."""
    machine = FakeMachine({2: 0.020, 1: 0.018})
    t = tuner(machine, explore_every=20, settle=3)
    t.run(lambda: machine.work(10), units=10)  # two threads, twice as slow this once
    machine.cost[2] = 0.010
    t.run(lambda: machine.work(10), units=10)  # the trial of one thread: faster than that run
    assert machine.ran == [2, 1] and t.current == 2 and not t.settled
    for _ in range(10):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2 and t.switches == 0 and t.settled


def test_work_outside_run_gets_the_current_count_not_the_last_trials():
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine)
    t.run(lambda: machine.work(10), units=10)
    t.run(lambda: machine.work(10), units=10)  # the trial of one thread
    assert machine.threads == 1 and t.current == 2
    t.use_current()  # a sampling change next
    assert machine.threads == 2


def test_a_prefill_outside_run_gets_the_most_threads_whatever_steps_are_fastest_on():
    """Decode steps (bound by memory) may run as fast on one thread; a prompt change's prefill
    (big matrix products) runs on all of them."""
    machine = FakeMachine({2: 0.0110, 1: 0.0100})
    t = tuner(machine, explore_every=20, settle=1)
    for _ in range(4):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1 and machine.threads == 1
    t.use_most()
    assert machine.threads == 2 and t.current == 1


def test_a_prefill_beside_a_busy_neighbour_keeps_the_current_count():
    """Where the most threads stall on each other (a step on two costs 2.5x one's), a prefill
    on them would stall too: it keeps the count the steps run on."""
    machine = FakeMachine({2: 0.050, 1: 0.020})
    t = tuner(machine, explore_every=20)
    for _ in range(4):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1
    t.use_most()
    assert machine.threads == 1
    machine.cost = {2: 0.011, 1: 0.010}  # the neighbour left: the next trial of 2 says so
    for _ in range(40):
        t.run(lambda: machine.work(10), units=10)
    t.use_most()
    assert machine.threads == 2


def test_trials_that_hit_a_cliff_come_less_often_and_as_often_again_once_it_is_gone():
    """Each trial of two threads beside a busy process costs 2.5x the run it replaces: after
    each such trial the next waits twice as long, up to MAX_BACKOFF times `explore_every`, and
    at least long enough that the trial's loss (1.5 runs) is TRIAL_SHARE of the runs between."""
    machine = FakeMachine({2: 0.050, 1: 0.020})
    t = tuner(machine, explore_every=10)
    for _ in range(400):
        t.run(lambda: machine.work(10), units=10)
    trials = [i for i, n in enumerate(machine.ran) if n == 2 and i > 3]
    gaps = [b - a for a, b in zip(trials, trials[1:], strict=False)]
    assert gaps[:2] == [round(1.5 / TRIAL_SHARE), 40] and set(gaps[2:]) == {10 * MAX_BACKOFF}
    machine.cost = {2: 0.022, 1: 0.020}  # close now: trials every 10 runs again
    ran = len(machine.ran)
    for _ in range(10 * MAX_BACKOFF + 30):
        t.run(lambda: machine.work(10), units=10)
    trials = [i for i, n in enumerate(machine.ran[ran:]) if n == 2]
    assert [b - a for a, b in zip(trials, trials[1:], strict=False)][-2:] == [10, 10]


def test_a_cliff_is_left_at_once():
    """Beside a busy process two threads can cost twice one thread's: no need to settle."""
    machine = FakeMachine({2: 0.040, 1: 0.018})
    t = tuner(machine, explore_every=20, settle=3)
    t.run(lambda: machine.work(10), units=10)
    t.run(lambda: machine.work(10), units=10)  # the one-thread trial: under half the cost
    assert t.current == 2  # one run of two threads could have been a slow first one
    t.run(lambda: machine.work(10), units=10)  # the second: it is the machine
    assert machine.ran == [2, 1, 2] and t.current == 1 and t.switches == 1


class ErraticMachine(FakeMachine):
    """Two threads beside busy processes on a KVM Xeon: every run of them stalls, by 2x to 5x
    one thread's cost, never twice alike (each run's cost jumps from the last by over 2x)."""

    def work(self, units: int = 10) -> int:
        if self.threads == 2:
            self.cost[2] = 0.300 if self.cost[2] != 0.300 else 0.130
        return super().work(units)


def test_a_count_that_stalls_erratically_is_left_too():
    """Runs of a stalling count that differ by over 2x each time never settle (each jump starts
    its cost afresh), but two in a row each over twice the other count's cost leave it."""
    machine = ErraticMachine({2: 0.130, 1: 0.060})
    t = tuner(machine, explore_every=20, settle=3)
    for _ in range(6):
        t.run(lambda: machine.work(10), units=10)
    assert machine.ran[:4] == [2, 1, 2, 2] and t.current == 1 and t.switches == 1
    assert machine.ran[4:] == [1, 1]  # (0.130 and 0.300 a unit: 2.2x and 5x of 0.060)


def test_a_trial_that_loses_tenfold_waits_until_it_costs_a_twentieth():
    """Two threads at 10x one thread's cost (4 s a chunk beside a busy process on a KVM Xeon):
    each trial loses 9 runs' time, so the next comes after 9 / TRIAL_SHARE runs at least."""
    machine = FakeMachine({2: 0.400, 1: 0.040})
    t = tuner(machine, explore_every=20)
    for _ in range(800):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1
    trials = [i for i, n in enumerate(machine.ran) if n == 2 and i > 3]
    gaps = [b - a for a, b in zip(trials, trials[1:], strict=False)]
    assert gaps and set(gaps) == {round(9 / TRIAL_SHARE)}, gaps
    spent = sum(machine.cost[n] for n in machine.ran[100:])
    assert spent < 1.06 * 0.040 * len(machine.ran[100:])  # trials: under 6% of the time


@pytest.mark.parametrize("stall", [0.450, 0.070])
def test_a_preempted_stall_is_left_after_its_first_run(stall: float):
    """Two threads beside a busy process on a KVM Xeon: x2-x15 one thread's cost (up to 12 s a
    chunk), their threads waiting in the run queue for most of it (85-105% of the wall time,
    summed). That is no noise: the first such run leaves them for the count predicted at under
    half its cost; without the run queue's word, a run at x2.3 once could be noise."""
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2
    machine.cost, machine.queued = {2: stall, 1: 0.031}, {2: 0.9}
    ran = len(machine.ran)
    for _ in range(3):
        t.run(lambda: machine.work(10), units=10)
    assert machine.ran[ran:] == [2, 1, 1] and t.current == 1 and t.switches == 1
    assert t.last_queued == 0.0
    # a stalled run is one whatever else it did (a prompt's fold): measured all the same, and
    # the stale quiet cost of two threads does not take the work back to them
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: machine.work(10), units=10)
    machine.cost, machine.queued = {2: stall, 1: 0.031}, {2: 0.9}
    t.run(lambda: machine.work(10), units=10, typical=lambda: False)
    assert t.current == 1 and t.cost[2] == pytest.approx(stall)
    for _ in range(10):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1 and t.switches == 1
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: machine.work(10), units=10)
    machine.cost = {2: 0.070, 1: 0.031}  # (not preempted: the neighbour's pause, page faults)
    t.run(lambda: machine.work(10), units=10)
    assert t.current == 2


class Stopped(Exception):
    pass


def stepped(machine: FakeMachine, t: ThreadTuner, units: int) -> int:
    """Work of `units` steps that asks `t.stalling()` before each (as the radio's decoder steps
    ask their interrupt) and stops when it says so."""
    for _ in range(units):
        if t.stalling():
            raise Stopped
        machine.work(1)
    return machine.threads


def test_a_stall_is_stopped_within_the_run_it_began_in():
    """A neighbour arriving during a 25-unit run of two threads (x22 their cost: 11 s) stops it
    once it has taken twice its expected time and one thread, predicted, would have made it in
    under half that: after 1.8 s, measured as the stall it is; the next run is on one thread.
    Not a run whose threads did not wait for cores (noise)."""
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: stepped(machine, t, 25), units=25)
    assert t.current == 2 and not t.stopped and t.stalling() is False  # (no run in progress)
    machine.cost, machine.queued = {2: 0.450, 1: 0.031}, {2: 0.9}
    began = machine.now
    with pytest.raises(Stopped):
        t.run(lambda: stepped(machine, t, 25), units=25)
    assert machine.now - began == pytest.approx(4 * 0.450)  # 4 of its 25 steps
    assert t.stopped and t.current == 1 and t.last_cost == pytest.approx(4 * 0.450 / 25)
    assert t.run(lambda: stepped(machine, t, 25), units=25) == 1 and not t.stopped
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: stepped(machine, t, 25), units=25)
    machine.cost = {2: 0.450, 1: 0.031}  # as slow, but nobody took the cores: not stopped
    assert t.run(lambda: stepped(machine, t, 25), units=25) == 2 and not t.stopped
    # one thread never measured (no trial yet): predicted at twice two threads' cost, and the
    # stall stopped all the same; the next run tries it
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(10):
        t.run(lambda: stepped(machine, t, 25), units=25, explore=False)
    machine.cost, machine.queued = {2: 0.450, 1: 0.031}, {2: 0.9}
    with pytest.raises(Stopped):  # (a read with little buffered: no trial)
        t.run(lambda: stepped(machine, t, 25), units=25, explore=False)
    assert t.stopped and machine.ran.count(2) == 250 + 5  # (2 s: one thread's 1 s, twice)
    assert t.current == 1  # (for the count predicted, not measured yet)


def test_a_stall_is_left_after_two_runs_whatever_kinds_of_work_they_were():
    """Short and steady reads are kinds of their own (`measure_for`), and a radio alternates
    them: a stall's runs, one per kind, once left every kind waiting for its second (27 s of
    bridge). Two runs of the current count, of any kinds, each over four times another count's
    cost: it is left, without the run queue's word (where the system does not give it)."""
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    t._queued = lambda: None  # (no run-queue figures)
    for i in range(12):
        t.measure_for(("short", "steady")[i % 2])
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2 and set(t.costs_of("steady")) == {1, 2}  # (1's trial at run 2)
    machine.cost = {2: 0.450, 1: 0.031}
    ran = len(machine.ran)
    for i in range(4):
        t.measure_for(("short", "steady")[i % 2])
        t.run(lambda: machine.work(10), units=10)
    # a stalled run (short), its trial (steady: the other kind), the second stalled run
    # (short); the steady kind's trial of one thread decides
    assert machine.ran[ran:] == [2, 1, 2, 1] and t.current == 1 and t.switches == 1
    # and the count that stalled has no cost left from before the stall in the other kind
    assert 2 not in t.costs_of("steady")


def test_a_count_that_jumped_is_forgotten_in_the_other_kinds():
    """Two threads' cost measured on a quiet machine in one kind of work must not take that
    kind back to two threads once they stall beside a neighbour in another."""
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    t.measure_for("steady")
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    assert t.costs_of("steady") == {2: pytest.approx(0.020), 1: pytest.approx(0.030)}
    t.measure_for("short")
    for _ in range(3):
        t.run(lambda: machine.work(10), units=10)
    machine.cost = {2: 0.100, 1: 0.031}  # 5x: the machine changed
    t.run(lambda: machine.work(10), units=10)
    assert t.costs_of("steady") == {1: pytest.approx(0.030)}


def test_a_preempted_run_makes_its_count_stale_in_the_other_kinds_too():
    """A stall can come at a kind of work's first run (the radio's first steady read beside a
    busy process: 8 s): no jump to see there, but its threads waited for cores."""
    machine = FakeMachine({2: 0.020, 1: 0.030})
    t = tuner(machine, explore_every=20)
    t.measure_for("short")
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    machine.cost, machine.queued = {2: 0.320, 1: 0.031}, {2: 0.9}
    t.measure_for("steady")
    t.run(lambda: machine.work(25), units=25)
    assert machine.ran[-1] == 2 and t.current == 1  # (left at once: 1 predicted from "short")
    assert t.costs_of("short") == {1: pytest.approx(0.030)}


def test_other_weights_keep_how_the_counts_compared():
    """`forget` (the radio took int4 weights) drops the costs, but two threads that stalled at
    10x one thread's are predicted at 10x on the new weights until measured there."""
    machine = FakeMachine({2: 0.300, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1
    t.forget()
    machine.cost = {2: 0.150, 1: 0.015}
    t.run(lambda: machine.work(10), units=10, explore=False)
    assert t.cost == {1: pytest.approx(0.015)} and t.next_trial() == 2  # (not measured here)
    assert t.trial_cost(2) == pytest.approx(0.150)
    t.run(lambda: machine.work(10), units=10)
    assert machine.ran[-1] == 2 and t.current == 1


def test_a_trial_is_predicted_from_its_last_cost_in_this_kind_or_another():
    machine = FakeMachine({2: 0.300, 1: 0.030})  # two threads stalling beside a neighbour
    t = tuner(machine, explore_every=20)
    t.measure_for("short")
    for _ in range(3):
        t.run(lambda: machine.work(10), units=10)
    assert machine.ran == [2, 1, 2] and t.current == 1  # (two runs of 2 at 10x: left)
    assert t.next_trial() is None and t.trial_cost(2) == pytest.approx(0.300)
    t.measure_for("steady")  # steady reads: each count x0.8 the cost per frame
    machine.cost = {2: 0.240, 1: 0.024}
    t.run(lambda: machine.work(25), units=25)
    assert t.trial_cost(2) == pytest.approx(0.300 * 0.024 / 0.030)  # scaled from "short"
    assert t.trial_cost(4) is None  # never measured
    while t.next_trial() is None:  # the next trial, when it comes, is the one predicted
        t.run(lambda: machine.work(25), units=25)
    assert machine.ran[-1] == 1 and t.next_trial() == 2
    t.run(lambda: machine.work(25), units=25)
    assert machine.ran[-1] == 2 and t.trial_cost(2) == pytest.approx(0.240)


def test_idle_cores_say_a_neighbour_left():
    """On one thread beside a busy process the machine has no idle core; when it has one for
    two runs, the neighbour left: two threads' stalled cost is stale (not predicted) and their
    trial comes at once instead of after the long wait the stalls earned."""
    machine = FakeMachine({2: 0.300, 1: 0.030})
    t = tuner(machine, explore_every=20)
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 1 and t.trial_cost(2) == pytest.approx(0.300)
    machine.cost, machine.idle = {2: 0.020, 1: 0.030}, 0.3  # a little idle: not a core
    for _ in range(3):
        t.run(lambda: machine.work(10), units=10)
    assert t.next_trial() is None and t.trial_cost(2) is not None
    machine.idle = 0.9  # the neighbour left
    t.run(lambda: machine.work(10), units=10)
    assert t.next_trial() is None  # (one run could be its pause)
    t.run(lambda: machine.work(10), units=10)
    assert t.next_trial() == 2 and t.trial_cost(2) is None
    t.run(lambda: machine.work(10), units=10)  # the trial: two threads fast again
    for _ in range(3):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2 and t.switches == 2


def test_the_machine_figures_come_from_proc():
    """Where Linux gives them: this process's run-queue waits and the machine's idle time,
    both in seconds and never going back."""
    queued, idle = queued_seconds(), idle_core_seconds()
    if queued is None or idle is None:
        pytest.skip("no /proc here")
    time.sleep(0.05)
    later_queued, later_idle = queued_seconds(), idle_core_seconds()
    assert later_queued is not None and later_idle is not None
    assert 0 <= queued <= later_queued + 0.01  # (a thread that ended takes its waits along)
    assert 0 <= idle <= later_idle
    # a busy process is running on a core whenever it is read (this one's own threads are not
    # counted: the radio's event loop at start-up)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        taken = cores_taken()
        assert taken is not None and taken >= 1
    finally:
        busy.kill()
        busy.wait()


def test_the_first_run_takes_the_cores_other_processes_leave(monkeypatch):
    """Beside a busy process two threads made the radio's first chunk in 5.9 s on a KVM Xeon:
    the first run takes what the machine's runnable threads leave free."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    for taken, most, first in [(None, 2, 2), (0, 2, 2), (6, 2, 2), (7, 2, 1), (4, 8, 4), (8, 8, 1)]:
        machine = FakeMachine({n: 0.01 for n in range(1, 9)})
        machine.taken = taken
        t = tuner(machine, most=most)
        t.run(lambda m=machine: m.work(10), units=10)
        assert machine.ran == [first] and t.current == first, (taken, most)


def test_more_threads_are_tried_beside_a_busy_process_and_taken_when_they_win():
    """On one thread beside a busy process (no core idle) two threads are still tried: seldom
    while they lose by much (a trial's loss at most TRIAL_SHARE of the runs between), and taken
    once they win (the step's threads as a team: x0.8 one thread's cost there)."""
    machine = FakeMachine({2: 0.300, 1: 0.030})
    machine.idle = 0.0
    t = tuner(machine, explore_every=10)
    for _ in range(403):
        t.run(lambda: machine.work(10), units=10)
    assert machine.ran[:3] == [2, 1, 2] and t.current == 1
    trials = machine.ran[3:].count(2)
    assert 1 <= trials <= 3, trials  # a x10 loss: the next trial ~180 runs later
    machine.cost = {2: 0.024, 1: 0.030}
    for _ in range(400):
        t.run(lambda: machine.work(10), units=10)
    assert t.current == 2


def test_barrier_regions_run_on_one_thread_while_the_threads_are_preempted():
    """The codec and a prefill (OpenMP's regions, each ending in a barrier) run on one thread
    while the tuner's run has had its threads waiting for cores, on the threads set otherwise
    and outside a run; the count comes back after."""
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine)
    seen: list[int] = []

    def work() -> None:
        machine.work(10)
        with barrier_regions():
            seen.append(torch.get_num_threads())

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t.run(work, units=10)
        machine.queued = {2: 0.9, 1: 0.9}  # a busy process came
        t.run(work, units=10)
        assert seen == [2, 1] and torch.get_num_threads() == 2
        with barrier_regions():  # no run in progress
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_costs_are_kept_per_kind_of_work():
    """`measure_for(key)`: three decoder rows a step cost more with every count than two; their
    costs are kept apart, and those of two rows come back afterwards; the count stays."""
    machine = FakeMachine({2: 0.010, 1: 0.018})
    t = tuner(machine, explore_every=20)
    t.measure_for(2)
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    two = dict(t.cost)
    t.measure_for(3)
    assert t.cost == {} and t.current == 2
    machine.cost = {2: 0.015, 1: 0.025}
    ran = len(machine.ran)
    for _ in range(5):
        t.run(lambda: machine.work(10), units=10)
    assert t.cost[2] == pytest.approx(0.015) and t.current == 2
    assert machine.ran[ran:] == [2] * 5  # no trial at once for the new kind: at the regular ones
    t.measure_for(2)
    assert t.cost == two
    t.measure_for(4)
    t.record(1, 0.010)  # a new kind whose first run was a (faster) trial: the current is unknown
    assert t.current == 2
    t.record(1, 0.003)  # ... but under a quarter of what its last two runs cost: a stall
    assert t.current == 1
    t.measure_for(2)
    assert t.costs_of(3) == {2: pytest.approx(0.015)}  # (no trial yet for that kind)
    assert t.costs_of(2) is t.cost and t.costs_of("never") == {}
    t.forget()
    assert t.cost == {}
    t.measure_for(3)
    assert t.cost == {}  # forgotten too


def test_returns_the_work_result_and_rejects_bad_settings():
    machine = FakeMachine({1: 0.01})
    t = tuner(machine, most=1)
    assert t.run(lambda: machine.work(1)) == 1
    machine.cost[1] = 0.05  # a jump up asks for a trial: with one core there is none to run
    for _ in range(3):
        assert t.run(lambda: machine.work(1)) == 1
    assert "1 thread(s)" in t.describe()
    with pytest.raises(ValueError, match="most"):
        ThreadTuner(0)
    with pytest.raises(ValueError, match="explore_every"):
        ThreadTuner(2, explore_every=1)


def test_thread_usage_tells_work_from_waiting() -> None:
    """A busy loop's wall time is on a core or queued for one; a wait on a lock (the GIL held
    by another thread, in the radio) is neither: `blocked`. Whatever the machine's load, the
    three add up to the wall time."""
    before = ThreadUsage.now()
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:
        pass
    busy = ThreadUsage.now().since(before)
    assert busy.cpu + busy.queued > 0.8 * busy.wall, busy.describe()
    assert busy.blocked < 0.2 * busy.wall, busy.describe()

    lock = threading.Lock()
    lock.acquire()
    threading.Timer(0.2, lock.release).start()
    before = ThreadUsage.now()
    lock.acquire()  # held by the timer's thread for 0.2 s
    waited = ThreadUsage.now().since(before)
    assert waited.wall >= 0.15
    assert waited.blocked > 0.8 * waited.wall, waited.describe()
    assert waited.cpu < 0.05, waited.describe()
