"""Slots as instants: across midnight, open ends, gaps, and both daylight-saving changes of
Europe/Paris in 2026 (spring forward on Sunday 29 March at 02:00, fall back on Sunday 25
October at 03:00), checked against UTC instants written out by hand."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from engine.blend import Blend
from radio.programme.options import Days, SlotConfig
from radio.programme.schedule import NO_SLOT, Schedule, Segment, wall_instant

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
HOUR = 3600.0


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


def slot(days: str, start: str, end: str = "", name: str = "") -> SlotConfig:
    return SlotConfig(
        name=name, days=Days.parse(days), start=start, end=end, prompts=(Blend.of(name or start),)
    )


def test_wall_times_in_normal_skipped_and_repeated_hours():
    assert wall_instant(PARIS, dt.date(2026, 3, 28), 150) == utc(2026, 3, 28, 1, 30)  # CET
    assert wall_instant(PARIS, dt.date(2026, 3, 30), 150) == utc(2026, 3, 30, 0, 30)  # CEST
    # 02:30 does not exist on 29 March: it happens when the clocks jump to 03:00 (01:00 UTC)
    assert wall_instant(PARIS, dt.date(2026, 3, 29), 150) == utc(2026, 3, 29, 1, 0)
    assert wall_instant(PARIS, dt.date(2026, 3, 29), 120) == utc(2026, 3, 29, 1, 0)
    assert wall_instant(PARIS, dt.date(2026, 3, 29), 180) == utc(2026, 3, 29, 1, 0)
    assert wall_instant(PARIS, dt.date(2026, 3, 29), 119) == utc(2026, 3, 29, 0, 59)
    # 02:30 happens twice on 25 October: the first time (CEST, 00:30 UTC), not 01:30 UTC
    assert wall_instant(PARIS, dt.date(2026, 10, 25), 150) == utc(2026, 10, 25, 0, 30)
    assert wall_instant(PARIS, dt.date(2026, 10, 25), 180) == utc(2026, 10, 25, 2, 0)
    # past midnight: minutes beyond a day are the next day's
    assert wall_instant(PARIS, dt.date(2026, 3, 28), 1440 + 150) == utc(2026, 3, 29, 1, 0)


def test_a_slot_across_midnight_belongs_to_the_day_it_starts():
    s = Schedule([slot("fri", "22:00", "02:00")], "Europe/Paris")
    # Friday 2026-06-05 22:00 CEST = 20:00 UTC, to Saturday 02:00 CEST = 00:00 UTC
    occurrence = Segment(0, utc(2026, 6, 5, 20), utc(2026, 6, 6, 0))
    assert s.segment_at(utc(2026, 6, 5, 23, 59)) == occurrence  # Sat 01:59 local
    assert s.segment_at(utc(2026, 6, 5, 20)) == occurrence
    after = s.segment_at(utc(2026, 6, 6, 0))  # Sat 02:00: the gap until next Friday
    assert after == Segment(NO_SLOT, utc(2026, 6, 6, 0), utc(2026, 6, 12, 20))
    # Friday 01:00 local belongs to no slot: Thursday is not in `days`
    assert s.segment_at(utc(2026, 6, 4, 23)).slot == NO_SLOT
    assert s.next_boundary(utc(2026, 6, 5, 21)) == utc(2026, 6, 6, 0)
    # today's schedule on Saturday shows Friday night's slot; on Sunday nothing
    assert s.day(utc(2026, 6, 6, 10)) == [occurrence]
    assert s.day(utc(2026, 6, 7, 10)) == []


def test_open_ends_run_until_the_next_slot_and_gaps_lie_between():
    s = Schedule(
        [
            slot("mon-fri", "07:00", "11:30"),
            slot("mon-fri", "11:30"),
            slot("daily", "18:00", "22:00"),
        ],
        "UTC",
    )
    mon = dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp()  # a Monday
    assert s.segment_at(mon + 8 * HOUR) == Segment(0, mon + 7 * HOUR, mon + 11.5 * HOUR)
    assert s.segment_at(mon + 12 * HOUR) == Segment(1, mon + 11.5 * HOUR, mon + 18 * HOUR)
    assert s.segment_at(mon + 23 * HOUR) == Segment(NO_SLOT, mon + 22 * HOUR, mon + 31 * HOUR)
    sat = mon + 5 * 24 * HOUR  # no morning slot at weekends: the gap runs to 18:00
    assert s.segment_at(sat + 9 * HOUR) == Segment(NO_SLOT, sat - 2 * HOUR, sat + 18 * HOUR)
    assert [x.slot for x in s.day(mon + 9 * HOUR)] == [0, 1, 2]
    assert [x.slot for x in s.day(sat + 9 * HOUR)] == [2]
    friday = mon + 4 * 24 * HOUR  # Friday's open-ended lunch slot stops at 18:00 too
    assert s.segment_at(friday + 17 * HOUR).end == friday + 18 * HOUR


def test_a_lone_open_slot_runs_until_its_next_start_and_no_slots_is_one_endless_gap():
    s = Schedule([slot("mon,thu", "09:00")], "UTC")
    mon = dt.datetime(2026, 6, 1, 9, tzinfo=dt.UTC).timestamp()
    assert s.segment_at(mon + 30 * HOUR) == Segment(0, mon, mon + 72 * HOUR)
    assert s.segment_at(mon + 80 * HOUR) == Segment(0, mon + 72 * HOUR, mon + 168 * HOUR)
    assert Schedule([], "UTC").segment_at(mon) == Segment(NO_SLOT, None, None)
    assert Schedule([], "UTC").next_boundary(mon) is None


def test_spring_forward_in_paris():
    s = Schedule(
        [slot("sun", "01:00", "04:00", "night"), slot("sun", "04:00", "06:00", "dawn")],
        "Europe/Paris",
    )
    # 01:00 CET = 00:00 UTC; 04:00 CEST = 02:00 UTC: the wall-clock 3 hours last 2 real hours
    night = s.segment_at(utc(2026, 3, 29, 1, 30))
    assert night == Segment(0, utc(2026, 3, 29, 0), utc(2026, 3, 29, 2))
    assert night.end - night.start == 2 * HOUR
    assert s.segment_at(utc(2026, 3, 29, 2)) == Segment(1, utc(2026, 3, 29, 2), utc(2026, 3, 29, 4))
    # a week earlier and later: 3 real hours
    before = s.segment_at(utc(2026, 3, 22, 1))
    assert before.end - before.start == 3 * HOUR


def test_a_slot_starting_in_the_skipped_hour_starts_when_the_clocks_jump():
    s = Schedule([slot("sun", "02:30", "05:00"), slot("sun", "02:05", "02:25")], "Europe/Paris")
    # 02:30 is skipped: the slot starts at 03:00 CEST (01:00 UTC) and ends at 05:00 CEST
    assert s.segment_at(utc(2026, 3, 29, 1)) == Segment(0, utc(2026, 3, 29, 1), utc(2026, 3, 29, 3))
    # 02:05-02:25 lies wholly inside the skipped hour: it does not play that day ...
    assert all(x.slot == 0 for x in s.day(utc(2026, 3, 29, 12)))
    assert s.segment_at(utc(2026, 3, 29, 0, 59)) == Segment(
        NO_SLOT, utc(2026, 3, 22, 4, 0), utc(2026, 3, 29, 1)
    )
    # ... but plays the Sunday before and after (CET then CEST)
    assert s.segment_at(utc(2026, 3, 22, 1, 20)).slot == 1
    assert s.segment_at(utc(2026, 4, 5, 0, 20)) == Segment(
        1, utc(2026, 4, 5, 0, 5), utc(2026, 4, 5, 0, 25)
    )


def test_fall_back_in_paris():
    s = Schedule([slot("sun", "01:00", "04:00")], "Europe/Paris")
    # 01:00 CEST = 23:00 UTC Saturday; 04:00 CET = 03:00 UTC: the wall-clock 3 hours last 4
    occ = s.segment_at(utc(2026, 10, 25, 1, 30))  # the second 02:30 local (CET) is inside
    assert occ == Segment(0, utc(2026, 10, 24, 23), utc(2026, 10, 25, 3))
    assert occ.end - occ.start == 4 * HOUR
    repeated = Schedule([slot("sun", "02:30", "03:30")], "Europe/Paris")
    # 02:30 is the first 02:30 (CEST, 00:30 UTC); 03:30 CET is 02:30 UTC: 2 real hours
    assert repeated.segment_at(utc(2026, 10, 25, 1)) == Segment(
        0, utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2, 30)
    )
    assert [x.slot for x in repeated.day(utc(2026, 10, 25, 12))] == [0]


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"])
def test_segments_tile_time_without_gaps_or_overlaps(zone):
    s = Schedule(
        [slot("mon-fri", "07:00", "11:30"), slot("daily", "11:30"), slot("sat", "23:00", "02:30")],
        zone,
    )
    t = utc(2026, 3, 1)
    end = utc(2026, 11, 15)
    prev = s.segment_at(t)
    while t < end:  # walk from boundary to boundary for eight and a half months
        nxt = s.next_boundary(t)
        assert nxt is not None and nxt > t
        seg = s.segment_at(nxt)
        assert seg.start == nxt and seg != prev
        prev, t = seg, nxt
