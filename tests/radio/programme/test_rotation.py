"""Rotation order: listed, shuffled (every prompt once per round, reproducible, never twice in a
row) and tick times from an anchor."""

from __future__ import annotations

import pytest

from radio.programme.rotation import Anchor, item_index


def test_listed_goes_round_in_order():
    assert [item_index(k, 3, "listed", seed=5) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_shuffled_plays_each_once_per_round_never_twice_in_a_row(n):
    for seed in range(40):
        seq = [item_index(k, n, "shuffled", seed) for k in range(20 * n)]
        for r in range(20):
            assert sorted(seq[r * n : (r + 1) * n]) == list(range(n))
        assert all(a != b for a, b in zip(seq, seq[1:], strict=False)), (seed, seq)
        assert seq == [item_index(k, n, "shuffled", seed) for k in range(20 * n)]  # reproducible


def test_shuffled_differs_by_seed_and_by_round():
    a = [item_index(k, 5, "shuffled", 1) for k in range(50)]
    b = [item_index(k, 5, "shuffled", 2) for k in range(50)]
    assert a != b
    rounds = {tuple(a[i : i + 5]) for i in range(0, 50, 5)}
    assert len(rounds) > 3  # not the same order every round
    assert item_index(1000, 5, "shuffled", 1) in range(5)  # any tick directly


def test_one_prompt_is_always_that_prompt():
    assert {item_index(k, 1, order, 9) for k in range(10) for order in ("listed", "shuffled")} == {
        0
    }


def test_ticks_count_real_seconds_from_the_anchor():
    a = Anchor(at=1000.0, index=4)
    assert a.tick_at(999.0, 60) == (4, 1000.0)
    assert a.tick_at(1000.0, 60) == (4, 1000.0)
    assert a.tick_at(1059.9, 60) == (4, 1000.0)
    assert a.tick_at(1060.0, 60) == (5, 1060.0)
    assert a.tick_at(1000.0 + 3600, 60) == (64, 4600.0)
    assert a.next_tick(1061.0, 60) == 1120.0
    assert a.tick_at(5000.0, 0) == (4, 1000.0) and a.next_tick(5000.0, 0) is None
