"""Several stations on the tiny model, read together by the generator: one batched codec decode
per round for all the stations that are due (`MusicModel.read_together`), and each station
hears what it hears when its stream is read alone."""

from __future__ import annotations

import asyncio

import numpy as np

import engine.model
from engine.blend import Blend
from engine.options import SamplingOptions, WindowOptions
from radio.generator import Generator, StationSpec
from tests.radio.fake_engine import Sink

PROMPTS = {"jazz": "slow jazz", "dnb": "fast drum and bass", "rain": "rain on a window"}
CHUNK, ROUNDS = 10, 5
WINDOW = WindowOptions(window=110, context=55)


def _snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30))


async def test_three_stations_share_one_codec_decode_per_round_and_hear_what_they_would_alone(
    radio_model, monkeypatch
):
    decodes: list[int] = []  # streams in each codec call
    decode_together = engine.model.decode_together

    def counted(calls):
        decodes.append(len(calls))
        return decode_together(calls)

    monkeypatch.setattr(engine.model, "decode_together", counted)
    greedy = SamplingOptions(greedy=True)
    specs = [StationSpec(sid, Blend.of(p), greedy, WINDOW) for sid, p in PROMPTS.items()]
    buffer_ahead = ROUNDS * CHUNK / radio_model.frame_rate  # the clocks never move: 5 rounds
    gen = Generator(radio_model, specs, buffer_ahead=buffer_ahead, chunk_frames=CHUNK)
    sink = Sink()
    gen.start(asyncio.get_running_loop(), sink)
    try:
        await sink.until(lambda: all(len(sink.pcm(s)) == ROUNDS for s in PROMPTS), timeout=120)
        await asyncio.sleep(0.2)  # nothing more is due
    finally:
        gen.stop()
    assert decodes == [len(PROMPTS)] * ROUNDS  # one codec call per round, every station in it
    assert gen.death == "" and gen.chunks == len(PROMPTS) * ROUNDS

    streams = radio_model.open_streams(list(PROMPTS.values()), [greedy] * len(PROMPTS), WINDOW)
    for sid, stream in zip(PROMPTS, streams, strict=True):
        alone = np.concatenate([stream.read(CHUNK) for _ in range(ROUNDS)], axis=1)
        heard = np.concatenate(sink.audio[sid], axis=1)
        assert heard.shape == alone.shape == (1, ROUNDS * CHUNK * radio_model.hop)
        assert sink.pcm(sid) == [CHUNK * r for r in range(ROUNDS)]
        assert _snr_db(alone, heard) >= 120, sid
    assert decodes == [len(PROMPTS)] * ROUNDS  # reading alone never went through it


def test_the_radio_tells_the_model_how_many_stations_share_its_steps(tiny_model_dir):
    """`build_radio` says the station count before any stream opens: a prompt's cross-attention
    is folded into its text only while that many such texts read fewer bytes than the
    projections' weights (tests/engine/test_folded_cross.py)."""
    from engine import LoadOptions, MusicModel
    from radio.app import build_radio
    from radio.config import parse_config

    model = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    assert model.decoder.fold_stations == 1
    ids = [{"id": s} for s in PROMPTS]
    build_radio(parse_config({"stations": ids}, env={}), model)
    assert model.decoder.fold_stations == len(PROMPTS)
