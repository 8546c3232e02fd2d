"""The listeners' say in `queue` mode: suggestions, upvotes and skip votes.

A listener's prompt becomes a `Suggestion` (its author's vote counts as the first); others
upvote it, one vote per client address per suggestion. The director takes the most-voted one
(ties: the oldest) at the next rotation tick. A skip vote counts distinct addresses for the item
playing now and passes at `needed(listeners) = max(skip_minimum, ceil(skip_threshold *
listeners))`. Suggestions and votes are rate-limited per address; the queue holds at most
`max_suggestions` and forgets a suggestion not played within `suggestion_minutes`.

Addresses are kept only as short SHA-256 digests (`voter_key`), so the state file holds no IP
addresses, and memory is bounded: caps on the queue, on voters per suggestion and skip, and on
the addresses a rate window remembers. `Refused` carries a `code` the API maps to a status.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.blend import Blend
from radio.programme.options import parse_rate_limit

MAX_VOTERS = 20_000  # addresses remembered per suggestion and per skip
MAX_RATE_KEYS = 10_000  # addresses a rate window remembers before it forgets idle ones

# Refused.code -> what it means (the API turns them into 403 / 404 / 409 / 429)
CODES = {
    "off": "listeners cannot change the music on this station",
    "rate_limited": "too many from this address; wait",
    "queue_full": "the queue is full; vote for a suggestion instead",
    "not_found": "no such suggestion",
    "already_voted": "this address has already voted for it",
    "pinned": "the admin pinned the music",
    "no_skip": "there is nothing to skip to",
}


class Refused(Exception):
    """A listener action the rules do not allow now; `code` is a key of CODES."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


def voter_key(address: str) -> str:
    """A client address as kept in memory and in the state file: 16 hex digits of SHA-256."""
    return hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class VoteRules:
    """The station's listener settings that the queue and the skip vote follow."""

    skip_threshold: float = 0.5  # share of the current listeners a skip needs; 0 = no skips
    skip_minimum: int = 2  # ... and at least this many addresses
    suggestion_limit: tuple[int, float] = (2, 600.0)  # suggestions per address per seconds
    vote_limit: tuple[int, float] = (30, 60.0)  # upvotes and skip votes per address per seconds
    max_suggestions: int = 20  # queue length
    suggestion_seconds: float = 7200.0  # a suggestion not played within this long leaves

    @classmethod
    def of_station(cls, s: Any) -> VoteRules:
        """From a `radio.config.StationConfig`."""
        return cls(
            skip_threshold=s.skip_threshold,
            skip_minimum=s.skip_minimum,
            suggestion_limit=parse_rate_limit(s.suggestion_rate_limit, "suggestion_rate_limit"),
            vote_limit=parse_rate_limit(s.vote_rate_limit, "vote_rate_limit"),
            max_suggestions=s.max_suggestions,
            suggestion_seconds=s.suggestion_minutes * 60,
        )

    def needed(self, listeners: int) -> int:
        """Distinct skip votes that pass a skip with `listeners` listening."""
        return max(self.skip_minimum, math.ceil(self.skip_threshold * max(listeners, 0)))


@dataclass
class Suggestion:
    id: int  # numbered from 1 per station, never reused
    blend: Blend
    at: float  # when it was suggested, Unix seconds
    voters: set[str] = field(default_factory=set)  # voter_key of each address that voted

    @property
    def votes(self) -> int:
        return len(self.voters)

    def to_json(self) -> dict[str, Any]:
        """What listeners see (no addresses)."""
        return {
            "id": self.id,
            "blend": self.blend.to_json(),
            "text": self.blend.describe(),
            "votes": self.votes,
            "at": self.at,
        }


@dataclass(frozen=True)
class SkipTally:
    votes: int  # distinct addresses that voted to skip the item playing now
    needed: int  # votes that pass it with the current listeners
    passed: bool


class RateWindow:
    """At most `count` events per `seconds` per key (a sliding window), keys bounded."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count = count
        self.seconds = seconds
        self._events: dict[str, deque[float]] = {}

    def check(self, key: str, now: float) -> float:
        """0 if allowed (and counted); else the seconds until it would be."""
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.seconds:
            q.popleft()
        if len(q) < self.count:
            q.append(now)
            self._forget_idle(now)
            return 0.0
        return (q[0] + self.seconds - now) if q else self.seconds

    def _forget_idle(self, now: float) -> None:
        if len(self._events) <= MAX_RATE_KEYS:
            return
        for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.seconds]:
            del self._events[k]
        while len(self._events) > MAX_RATE_KEYS:  # a flood within one window: oldest first
            del self._events[next(iter(self._events))]


class VoteBox:
    """One station's suggestion queue and skip vote; every method takes the time it happens."""

    def __init__(self, rules: VoteRules) -> None:
        self.rules = rules
        self.suggestions: dict[int, Suggestion] = {}
        self.next_id = 1
        self.skip_key: float | None = None  # when the item being voted on started playing
        self.skip_voters: set[str] = set()
        self._suggest_rate = RateWindow(*rules.suggestion_limit)
        self._vote_rate = RateWindow(*rules.vote_limit)

    def queue(self, now: float) -> list[Suggestion]:
        """Waiting suggestions, the one that would be taken next first."""
        self.expire(now)
        return sorted(self.suggestions.values(), key=lambda s: (-s.votes, s.at, s.id))

    def top(self, now: float) -> Suggestion | None:
        q = self.queue(now)
        return q[0] if q else None

    def suggest(self, address: str, blend: Blend, now: float) -> Suggestion:
        """Queue `blend` (or add a vote to the equal suggestion already waiting)."""
        self.expire(now)
        voter = voter_key(address)
        same = next((s for s in self.suggestions.values() if s.blend == blend), None)
        if same is not None and voter in same.voters:
            raise Refused("already_voted", f"suggestion #{same.id} already has your vote")
        if same is None and len(self.suggestions) >= self.rules.max_suggestions:
            raise Refused(
                "queue_full",
                f"the queue is full ({self.rules.max_suggestions} suggestions); vote for one",
            )
        self._limit(self._suggest_rate, voter, now, "suggestions")
        if same is not None:
            self._add_vote(same, voter)
            return same
        s = Suggestion(self.next_id, blend, now, {voter})
        self.suggestions[s.id] = s
        self.next_id += 1
        return s

    def upvote(self, address: str, suggestion_id: int, now: float) -> Suggestion:
        self.expire(now)
        s = self.suggestions.get(suggestion_id)
        if s is None:
            raise Refused("not_found", f"no suggestion #{suggestion_id} in the queue")
        voter = voter_key(address)
        if voter in s.voters:
            raise Refused("already_voted", f"suggestion #{s.id} already has your vote")
        self._limit(self._vote_rate, voter, now, "votes")
        self._add_vote(s, voter)
        return s

    def skip(self, address: str, item_since: float, listeners: int, now: float) -> SkipTally:
        """A vote to skip the item that began playing at `item_since`."""
        if self.rules.skip_threshold == 0:
            raise Refused("off", "skip votes are off on this station")
        if self.skip_key != item_since:
            self.skip_key, self.skip_voters = item_since, set()
        voter = voter_key(address)
        if voter in self.skip_voters:
            raise Refused("already_voted", "this address already voted to skip this")
        self._limit(self._vote_rate, voter, now, "votes")
        if len(self.skip_voters) < MAX_VOTERS:
            self.skip_voters.add(voter)
        needed = self.rules.needed(listeners)
        return SkipTally(len(self.skip_voters), needed, len(self.skip_voters) >= needed)

    def skip_tally(self, item_since: float, listeners: int) -> SkipTally:
        votes = len(self.skip_voters) if self.skip_key == item_since else 0
        needed = self.rules.needed(listeners)
        return SkipTally(votes, needed, votes >= needed)

    def take(self, now: float) -> Suggestion | None:
        """Remove and return the most-voted suggestion (ties: the oldest)."""
        s = self.top(now)
        if s is not None:
            del self.suggestions[s.id]
        return s

    def remove(self, suggestion_id: int) -> Suggestion:
        s = self.suggestions.pop(suggestion_id, None)
        if s is None:
            raise Refused("not_found", f"no suggestion #{suggestion_id} in the queue")
        return s

    def clear(self) -> int:
        n = len(self.suggestions)
        self.suggestions.clear()
        return n

    def expire(self, now: float) -> None:
        old = now - self.rules.suggestion_seconds
        for sid in [sid for sid, s in self.suggestions.items() if s.at <= old]:
            del self.suggestions[sid]

    def _limit(self, window: RateWindow, voter: str, now: float, what: str) -> None:
        wait = window.check(voter, now)
        if wait > 0:
            raise Refused(
                "rate_limited",
                f"too many {what} from your address; try again in {math.ceil(wait)} s",
                retry_after=wait,
            )

    @staticmethod
    def _add_vote(s: Suggestion, voter: str) -> None:
        if len(s.voters) < MAX_VOTERS:
            s.voters.add(voter)

    def to_state(self) -> dict[str, Any]:
        return {
            "next_id": self.next_id,
            "suggestions": [
                {"id": s.id, "blend": s.blend.to_json(), "at": s.at, "voters": sorted(s.voters)}
                for s in self.suggestions.values()
            ],
            "skip": {"item_since": self.skip_key, "voters": sorted(self.skip_voters)},
        }

    @classmethod
    def from_state(cls, rules: VoteRules, data: Mapping[str, Any], where: str) -> VoteBox:
        """A queue from `to_state()`; ValueError naming the bad key. Rate windows start empty."""
        box = cls(rules)
        box.next_id = _number(data, "next_id", where, int)
        raw = data.get("suggestions")
        if not isinstance(raw, list):
            raise ValueError(f"{where}.suggestions: expected a list")
        for i, item in enumerate(raw[: rules.max_suggestions]):
            w = f"{where}.suggestions[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{w}: expected an object")
            s = Suggestion(
                _number(item, "id", w, int),
                Blend.parse(item.get("blend"), f"{w}.blend"),
                _number(item, "at", w, float),
                _voters(item.get("voters"), f"{w}.voters"),
            )
            box.suggestions[s.id] = s
            box.next_id = max(box.next_id, s.id + 1)
        skip = data.get("skip")
        if not isinstance(skip, Mapping):
            raise ValueError(f"{where}.skip: expected an object")
        since = skip.get("item_since")
        box.skip_key = (
            None if since is None else _number(skip, "item_since", f"{where}.skip", float)
        )
        box.skip_voters = _voters(skip.get("voters"), f"{where}.skip.voters")
        return box


def _number(data: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value: Any = data.get(key)
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _voters(value: Any, where: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings")
    return set(value[:MAX_VOTERS])
