"""ICY metadata round trips byte by byte: blocks are well formed, the interleaver puts one after
every metaint audio bytes (full on change, L=0 otherwise), and the reader gets back the exact
audio and titles whatever the split points, with quotes, non-ASCII and over-long titles."""

from __future__ import annotations

import numpy as np
import pytest

from radio.icy import MAX_BLOCK, IcyInterleaver, format_stream_title, parse_stream_title
from tests.helpers import IcyReader


def test_block_layout():
    block = format_stream_title("slow jazz")
    assert block[0] == 2 and len(block) == 1 + 32
    assert block[1:].rstrip(b"\0") == b"StreamTitle='slow jazz';"
    assert parse_stream_title(block[1:]) == "slow jazz"
    assert format_stream_title("")[1:].rstrip(b"\0") == b"StreamTitle='';"


@pytest.mark.parametrize(
    "title",
    ["it's a 'quoted' title';", "back\\slash \\'", "Café — 東京の雨 🎷", "tab\tnew\nline"],
)
def test_escaping_round_trips(title):
    block = format_stream_title(title)
    assert len(block) == 1 + 16 * block[0]
    body = block[1:].rstrip(b"\0")
    assert body.startswith(b"StreamTitle='") and body.endswith(b"';")
    assert b"'" not in body[13:-2].replace(b"\\'", b"")  # every quote inside is escaped
    expected = title.replace("\t", " ").replace("\n", " ")
    assert parse_stream_title(block[1:]) == expected


def test_long_titles_are_cut_at_a_whole_character():
    for title in ["é" * 5000, "'" * 5000, "a" + "🎷" * 2000]:
        block = format_stream_title(title)
        assert block[0] == 255 and len(block) == 1 + MAX_BLOCK
        parsed = parse_stream_title(block[1:])
        assert "\ufffd" not in parsed  # no broken UTF-8 sequence
        assert title.startswith(parsed) and len(parsed) > 1000
        body = block[1:].rstrip(b"\0")
        assert body.endswith(b"';") and not body.endswith(b"\\';")


def _split_feed(reader: IcyReader, data: bytes, rng: np.random.Generator):
    audio, titles, i = bytearray(), [], 0
    while i < len(data):
        n = int(rng.integers(1, 50))
        a, t = reader.feed(data[i : i + n])
        audio += a
        titles += t
        i += n
    return bytes(audio), titles


def test_interleave_then_read_back_with_random_splits():
    rng = np.random.default_rng(0)
    metaint = 100
    writer = IcyInterleaver(metaint)
    script = ["first", "first", "first", "second 'b'", "second 'b'", "трети", "трети"]
    audio = rng.integers(0, 256, size=len(script) * 170, dtype=np.uint8).tobytes()
    stream = bytearray()
    for k, title in enumerate(script):
        stream += writer.feed(audio[k * 170 : (k + 1) * 170], title)
    n_blocks = len(audio) // metaint
    assert len(stream) > len(audio) + n_blocks  # the full blocks cost more than L=0 bytes
    # The byte at every metaint boundary is a length byte: walk them.
    i, lengths = 0, []
    while i + metaint < len(stream):
        i += metaint
        lengths.append(stream[i])
        i += 1 + 16 * stream[i]
    assert len(lengths) == n_blocks and lengths[0] > 0
    reader = IcyReader(metaint)
    got_audio, titles = _split_feed(reader, bytes(stream), rng)
    assert got_audio == audio
    assert titles == ["first", "second 'b'", "трети"]  # full blocks only on change
    assert reader.blocks == n_blocks
    assert sum(1 for n in lengths if n) == 3


def test_each_listener_gets_a_full_block_first():
    late = IcyInterleaver(16)
    out = late.feed(b"x" * 40, "now playing")
    assert out[16] > 0  # first block is full even though the title never "changed"
    second = 16 + 1 + 16 * out[16] + 16
    assert out[second] == 0  # unchanged afterwards
    assert IcyReader(16).feed(out)[1] == ["now playing"]


def test_bad_metaint_is_named():
    with pytest.raises(ValueError, match="metaint"):
        IcyInterleaver(0)
    with pytest.raises(ValueError, match="metaint"):
        IcyReader(-1)
