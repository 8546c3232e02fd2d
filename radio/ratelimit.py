"""`RateLimiter`: at most `count` events per `seconds` per key (prompt changes per address)."""

from __future__ import annotations

import time
from collections import deque

FORGET_ABOVE = 10000  # keys kept before idle ones are forgotten (a flood of addresses)


class RateLimiter:
    """At most `count` events per `seconds` per key (a sliding window of timestamps)."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count = count
        self.seconds = seconds
        self._events: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> float:
        """0 if allowed (and counted); else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.seconds:
            q.popleft()
        if len(q) < self.count:
            q.append(now)
            return 0.0
        self._forget_idle(now)
        return (q[0] + self.seconds - now) if q else self.seconds

    def __len__(self) -> int:
        """Keys remembered."""
        return len(self._events)

    def _forget_idle(self, now: float) -> None:
        if len(self._events) > FORGET_ABOVE:  # keep memory bounded under a flood of addresses
            for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.seconds]:
                del self._events[k]
