"""Rotation: which of a slot's n prompts plays at rotation tick k, and when ticks fall.

Ticks count real elapsed time (not wall-clock time) from an anchor: the slot occurrence's start,
or the moment a skip vote moved the rotation on. Item k of the rotation is

- `listed`: prompt k mod n, in the order written;
- `shuffled`: round r = k // n is a permutation of all n prompts drawn from `seed` and r alone
  (so any tick is computed directly, and the same seed gives the same sequence after a
  restart); the first prompt of a round is swapped away when it equals the last one of the
  round before, so no prompt ever plays twice in a row (n = 2 simply alternates).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def item_index(k: int, n: int, order: str, seed: int) -> int:
    """The prompt (0..n-1) playing at rotation tick k >= 0."""
    assert n >= 1 and k >= 0, f"item_index({k}, {n})"
    if order == "listed" or n == 1:
        return k % n
    assert order == "shuffled", f"unknown order {order!r}"
    if n == 2:
        return (k + random.Random(f"{seed}/first").randrange(2)) % 2
    r, position = divmod(k, n)
    return _round(seed, r, n)[position]


def _draw(seed: int, r: int, n: int) -> tuple[list[int], random.Random]:
    rng = random.Random(f"{seed}/{r}")  # str seeds hash the same in every process
    order = list(range(n))
    rng.shuffle(order)
    return order, rng


def _round(seed: int, r: int, n: int) -> list[int]:
    order, rng = _draw(seed, r, n)
    if r > 0 and order[0] == _draw(seed, r - 1, n)[0][-1]:
        j = rng.randrange(1, n - 1)  # never the last place: each round's last stays its draw's
        order[0], order[j] = order[j], order[0]
    return order


@dataclass(frozen=True)
class Anchor:
    """Rotation tick `index` began at `at` (Unix seconds); later ticks every `period` seconds."""

    at: float
    index: int = 0

    def tick_at(self, t: float, period: float) -> tuple[int, float]:
        """(the tick playing at t, when it began); period 0 = no rotation: the anchor's tick."""
        if period <= 0 or t < self.at:
            return self.index, self.at
        k = math.floor((t - self.at) / period)
        return self.index + k, self.at + k * period

    def next_tick(self, t: float, period: float) -> float | None:
        """When the tick after the one playing at t begins (None: no rotation)."""
        if period <= 0:
            return None
        return self.tick_at(t, period)[1] + period
