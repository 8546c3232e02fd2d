"""The suggestion queue and the skip vote: one vote per address, ties to the oldest, rate limits,
bounded memory, expiry, and a state round trip without IP addresses."""

from __future__ import annotations

import json

import pytest

from engine.blend import Blend
from radio.programme import votes as votes_mod
from radio.programme.votes import RateWindow, Refused, VoteBox, VoteRules, voter_key

RULES = VoteRules(
    skip_threshold=0.5,
    skip_minimum=2,
    suggestion_limit=(2, 600.0),
    vote_limit=(3, 60.0),
    max_suggestions=3,
    suggestion_seconds=3600.0,
)
JAZZ, RAIN, BIRDS, SEA = (Blend.of(x) for x in ("jazz", "rain", "birds", "sea"))


def refused(code: str, fn, *args) -> Refused:
    with pytest.raises(Refused) as e:
        fn(*args)
    assert e.value.code == code, str(e.value)
    return e.value


def test_most_votes_win_and_ties_go_to_the_oldest():
    box = VoteBox(RULES)
    a = box.suggest("10.0.0.1", JAZZ, 100.0)
    b = box.suggest("10.0.0.2", RAIN, 101.0)
    c = box.suggest("10.0.0.3", BIRDS, 102.0)
    assert (a.id, b.id, c.id) == (1, 2, 3) and a.votes == 1
    box.upvote("10.0.0.4", c.id, 103.0)
    box.upvote("10.0.0.5", b.id, 104.0)
    assert [s.id for s in box.queue(105.0)] == [2, 3, 1]  # 2 votes each: #2 is older than #3
    assert box.take(105.0) is b and box.take(105.0) is c and box.take(105.0) is a
    assert box.take(105.0) is None
    assert box.suggest("10.0.0.1", SEA, 106.0).id == 4  # ids are never reused


def test_one_vote_per_address_and_suggesting_a_queued_blend_is_a_vote():
    box = VoteBox(RULES)
    s = box.suggest("10.0.0.1", JAZZ, 0.0)
    refused("already_voted", box.upvote, "10.0.0.1", s.id, 1.0)
    box.upvote("10.0.0.2", s.id, 2.0)
    refused("already_voted", box.upvote, "10.0.0.2", s.id, 3.0)
    same = box.suggest("10.0.0.3", Blend.parse(" jazz "), 4.0)
    assert same is s and s.votes == 3 and len(box.suggestions) == 1
    refused("already_voted", box.suggest, "10.0.0.3", JAZZ, 5.0)
    refused("not_found", box.upvote, "10.0.0.4", 99, 6.0)


def test_rate_limits_per_address():
    box = VoteBox(RULES)
    box.suggest("10.0.0.1", JAZZ, 0.0)
    box.suggest("10.0.0.1", RAIN, 1.0)
    e = refused("rate_limited", box.suggest, "10.0.0.1", BIRDS, 2.0)
    assert e.retry_after == pytest.approx(598.0) and "try again in 598 s" in str(e)
    box.suggest("10.0.0.2", BIRDS, 2.0)  # another address may
    box.remove(1), box.remove(2)
    box.suggest("10.0.0.1", SEA, 600.5)  # the window has slid past the first one
    ids = [s.id for s in box.queue(601.0)]
    for i, voter in enumerate(("a", "b", "c")):
        box.upvote(voter, ids[0], 610.0 + i)
    for voter in ("a", "b", "c"):
        box.upvote(voter, ids[1], 620.0)
    box.skip("a", 0.0, 10, 630.0)  # the third vote in a minute
    refused("rate_limited", box.skip, "a", 1.0, 10, 631.0)  # skips share the vote limit


def test_the_queue_is_bounded_and_forgets_old_suggestions():
    box = VoteBox(RULES)
    for i, b in enumerate((JAZZ, RAIN, BIRDS)):
        box.suggest(f"10.0.0.{i}", b, float(i))
    refused("queue_full", box.suggest, "10.0.0.9", SEA, 10.0)
    box.upvote("10.0.0.9", 1, 11.0)  # a full queue still takes votes
    assert [s.id for s in box.queue(3600.5)] == [2, 3]  # #1 (at 0.0) expired after an hour
    box.suggest("10.0.0.9", SEA, 3600.5)
    assert box.clear() == 3 and box.queue(3601.0) == []
    refused("not_found", box.remove, 2)


def test_skip_counts_distinct_addresses_for_the_item_playing_now():
    box = VoteBox(RULES)
    assert RULES.needed(0) == 2 and RULES.needed(3) == 2 and RULES.needed(5) == 3
    t = box.skip("10.0.0.1", 100.0, 5, 0.0)
    assert (t.votes, t.needed, t.passed) == (1, 3, False)
    refused("already_voted", box.skip, "10.0.0.1", 100.0, 5, 1.0)
    assert box.skip("10.0.0.2", 100.0, 5, 2.0).passed is False
    assert box.skip("10.0.0.3", 100.0, 5, 3.0).passed is True
    # a new item starts a new count
    assert box.skip("10.0.0.1", 200.0, 5, 4.0).votes == 1
    assert box.skip_tally(200.0, 1).votes == 1 and box.skip_tally(300.0, 1).votes == 0
    off = VoteBox(VoteRules(skip_threshold=0))
    refused("off", off.skip, "10.0.0.1", 100.0, 5, 0.0)


def test_rate_windows_forget_idle_addresses(monkeypatch):
    monkeypatch.setattr(votes_mod, "MAX_RATE_KEYS", 100)
    w = RateWindow(1, 10.0)
    for i in range(300):
        assert w.check(f"a{i}", float(i)) == 0.0
    assert len(w._events) <= 101
    assert w.check("a299", 299.5) == pytest.approx(9.5)


def test_state_round_trip_keeps_no_addresses():
    box = VoteBox(RULES)
    s = box.suggest(
        "192.0.2.7", Blend.parse([{"text": "jazz", "weight": 3}, {"text": "rain"}]), 5.0
    )
    box.upvote("192.0.2.8", s.id, 6.0)
    box.skip("192.0.2.9", 42.0, 10, 7.0)
    data = json.loads(json.dumps(box.to_state()))
    assert "192.0.2" not in json.dumps(data)
    assert voter_key("192.0.2.7") in data["suggestions"][0]["voters"]
    back = VoteBox.from_state(RULES, data, "queue")
    assert [(x.id, x.blend, x.at, x.voters) for x in back.queue(8.0)] == [
        (s.id, s.blend, s.at, s.voters)
    ]
    assert back.next_id == 2 and back.skip_tally(42.0, 10).votes == 1
    refused("already_voted", back.upvote, "192.0.2.8", s.id, 9.0)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"next_id": "1"}, "queue.next_id: expected an integer"),
        ({"suggestions": {}}, "queue.suggestions: expected a list"),
        (
            {"suggestions": [{"id": 1, "blend": "x", "at": 0, "voters": [3]}]},
            "queue.suggestions[0].voters",
        ),
        (
            {"suggestions": [{"id": 1, "blend": 5, "at": 0, "voters": []}]},
            "queue.suggestions[0].blend",
        ),
        ({"skip": None}, "queue.skip: expected an object"),
    ],
)
def test_bad_state_names_the_key(patch, message):
    data = {**VoteBox(RULES).to_state(), **patch}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        VoteBox.from_state(RULES, data, "queue")
