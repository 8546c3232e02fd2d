"""One station's live state: the buffer of audio ahead of the clock (numbered by sample, cut
where a new prompt begins, resynced when the generator is out of step), the prompt history and
the listener counts with their events."""

from __future__ import annotations

import logging

import numpy as np

from engine.options import SamplingOptions
from radio.config import StationConfig
from radio.station import HISTORY_LENGTH, PcmBuffer, Station


def pcm(n: int, v: float) -> np.ndarray:
    return np.full((1, n), v, np.float32)


def test_station_buffer_takes_cuts_and_follows():
    b = PcmBuffer(1)
    b.append(0, pcm(100, 1))
    assert b.take(30).shape == (1, 30) and (b.head, b.tail) == (30, 100)
    # a prompt change from sample 50: the old audio beyond it goes, the new follows it
    assert b.truncate(50).shape == (1, 50) and b.tail == 50
    b.append(50, pcm(10, 2))
    assert (b.take(30)[0, 20:] == 2).all() and len(b) == 0
    # a cut inside audio already played: the new audio starts where the clock is
    b.append(60, pcm(40, 1))
    b.take(10)
    assert b.truncate(65).shape == (1, 30) and b.tail == 70  # all of [70, 100)
    b.truncate(62)
    assert (b.head, b.tail) == (70, 70)
    b.append(62, pcm(20, 3))
    assert (b.head, b.tail) == (70, 82) and (b.take(5) == 3).all()


def test_take_spans_chunks_and_never_more_than_there_is():
    b = PcmBuffer(2)
    for i in range(4):
        b.append(10 * i, np.full((2, 10), i, np.float32))
    got = b.take(25)
    assert got.shape == (2, 25) and list(got[0, ::5]) == [0, 0, 1, 1, 2]
    assert b.take(100).shape == (2, 15) and b.take(5).shape == (2, 0)
    assert (b.head, len(b)) == (40, 0)


def test_audio_out_of_step_resyncs_with_a_log_line(caplog):
    b = PcmBuffer(1)
    b.append(0, pcm(100, 1))
    with caplog.at_level(logging.WARNING, logger="radio.station"):
        b.append(80, pcm(40, 2))  # overlaps the tail: the newest audio wins from 80
        assert (b.tail, float(b.take(100)[0, 79]), len(b)) == (120, 1.0, 20)
        b.append(200, pcm(10, 3))  # a gap: go on from the new audio
    assert (b.head, b.tail) == (200, 210)
    assert caplog.text.count("does not follow the buffer") == 2
    b.append(150, pcm(100, 4))  # begins before the head: only what follows it is kept
    assert (b.head, b.tail) == (200, 250) and (b.take(50)[0, 10:] == 4).all()


def test_history_keeps_the_newest_first_and_tells_subscribers():
    st = Station(StationConfig(), 0, 1, SamplingOptions())
    q = st.events.subscribe()
    for i in range(HISTORY_LENGTH + 5):
        st.record_prompt(f"p{i}", "listener", at=1000.0 + i)
    assert len(st.history) == HISTORY_LENGTH and st.history[0].prompt == f"p{HISTORY_LENGTH + 4}"
    assert st.prompt_json()["prompt_since"] == "1970-01-01T00:17:04.000Z"
    event, data = q.get_nowait()
    assert event == "prompt" and data["prompt"] == "p0" and data["source"] == "listener"


def test_listener_counts_are_published_only_when_they_change():
    st = Station(StationConfig(), 0, 1, SamplingOptions())
    q = st.events.subscribe()
    st.set_listeners(mp3=2)
    st.set_listeners(mp3=2)
    st.set_listeners(hls=1)
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert got == [
        ("listeners", {"mp3": 2, "hls": 0, "total": 2}),
        ("listeners", {"mp3": 2, "hls": 1, "total": 3}),
    ]


def test_a_prompt_cut_keeps_the_old_audio_as_a_reserve_handed_out_once_at_the_cut():
    b = PcmBuffer(1)
    b.append(0, np.arange(100, dtype=np.float32)[None])
    b.take(10)
    b.truncate(40, keep_reserve=True)
    assert b.reserve_here() is None  # 30 samples still buffered before the cut
    b.take(30)
    reserve = b.reserve_here()
    assert reserve is not None and np.array_equal(reserve[0], np.arange(40, 100))
    assert b.reserve_here() is None  # handed out once


def test_a_second_cut_before_new_audio_keeps_the_whole_old_continuation():
    b = PcmBuffer(1)
    b.append(0, np.arange(100, dtype=np.float32)[None])
    b.truncate(60, keep_reserve=True)
    b.truncate(30, keep_reserve=True)  # nothing came after the first cut yet
    b.take(30)
    reserve = b.reserve_here()
    assert reserve is not None and np.array_equal(reserve[0], np.arange(30, 100))


def test_new_audio_or_a_plain_cut_ends_the_reserve():
    b = PcmBuffer(1)
    b.append(0, np.arange(100, dtype=np.float32)[None])
    b.truncate(50, keep_reserve=True)
    b.append(50, np.full((1, 10), -1, np.float32))  # the new prompt's audio
    b.take(55)  # past the cut
    assert b.reserve_here() is None
    b.truncate(55, keep_reserve=True)
    b.truncate(55)  # a re-anchor: nothing held
    b.take(10)
    assert b.reserve_here() is None
