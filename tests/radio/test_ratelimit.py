"""The per-address rate limit: a sliding window, the wait it reports, bounded memory."""

from __future__ import annotations

from radio import ratelimit
from radio.ratelimit import RateLimiter


def test_a_sliding_window_per_key():
    limit = RateLimiter(2, 60.0)
    assert limit.check("a", now=0.0) == 0 and limit.check("a", now=10.0) == 0
    assert limit.check("a", now=20.0) == 40.0  # the first one leaves the window at 60 s
    assert limit.check("b", now=20.0) == 0  # another address has its own window
    assert limit.check("a", now=59.9) > 0
    assert limit.check("a", now=60.0) == 0  # 0 s left the window: room for one
    assert limit.check("a", now=61.0) == 9.0  # until 10 s leaves it
    assert RateLimiter(0, 1.0).check("a", now=0.0) == 1.0  # nobody (admin only)


def test_memory_stays_bounded_under_a_flood_of_addresses(monkeypatch):
    monkeypatch.setattr(ratelimit, "FORGET_ABOVE", 100)
    limit = RateLimiter(1, 10.0)
    for i in range(150):
        limit.check(f"10.0.0.{i}", now=float(i) / 100)
    assert len(limit) == 150
    assert limit.check("10.0.0.1", now=20.0) == 0  # all idle by now
    assert limit.check("10.0.0.1", now=20.5) > 0  # over its limit: idle keys are forgotten
    assert len(limit) == 1
