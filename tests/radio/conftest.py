"""Fixtures of the radio tests: `run` starts the generator's worker thread on a fake engine
(tests/radio/fake_engine.py)."""

from __future__ import annotations

import asyncio

import pytest

from radio.generator import Generator
from tests.radio.fake_engine import CHUNK, Sink, spec


@pytest.fixture
async def run():
    """run(model, stations, faults=None, buffer_ahead=1.0, window=None, **generator options)
    -> (generator, sink), started; stopped afterwards."""
    started: list[Generator] = []

    async def start(model, stations=("a",), faults=None, buffer_ahead=1.0, window=None, **options):
        gen = Generator(
            model,
            [spec(s, window) for s in stations],
            buffer_ahead=buffer_ahead,
            chunk_frames=CHUNK,
            faults=faults,
            **options,
        )
        sink = Sink()
        gen.start(asyncio.get_running_loop(), sink)
        started.append(gen)
        return gen, sink

    yield start
    for gen in started:
        gen.stop()
