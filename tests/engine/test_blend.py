"""Prompt blends: parsing with errors that name the part, normalised weights, equality,
describe / dominant / JSON, and the glide of a transition."""

from __future__ import annotations

import json
import math

import pytest

from engine.blend import MAX_PARTS, Blend, clean_text


def test_a_plain_string_is_a_blend_of_one_cleaned_like_a_prompt():
    b = Blend.parse("  warm   jazz\u00a0trio ")
    assert b.parts == (("warm jazz trio", 1.0),)
    assert b.dominant == "warm jazz trio" and b.describe() == "warm jazz trio"
    assert b.to_value() == "warm jazz trio"
    assert Blend.parse("") == Blend.of("")  # unconditional music, where the caller allows it


def test_weights_are_normalised_and_described_in_percent():
    b = Blend.parse(
        [{"text": "warm jazz trio", "weight": 7}, {"text": "rain on a window", "weight": 3}]
    )
    assert b.parts == (("warm jazz trio", 0.7), ("rain on a window", 0.3))
    assert b.describe() == "warm jazz trio 70% + rain on a window 30%"
    assert b.dominant == "warm jazz trio"
    assert math.fsum(b.weights) == 1.0
    thirds = Blend.parse([{"text": "a"}, {"text": "b"}, {"text": "c"}])  # no weight = 1 each
    assert thirds.weights == (1 / 3, 1 / 3, 1 / 3)
    assert thirds.describe() == "a 33% + b 33% + c 33%"
    assert thirds.dominant == "a"  # a tie goes to the first


def test_equality_ignores_order_and_scale_and_json_round_trips():
    a = Blend.parse([{"text": "x", "weight": 0.25}, {"text": "y", "weight": 0.75}])
    b = Blend.parse([{"text": "y", "weight": 3}, {"text": "x", "weight": 1}])
    assert a == b and hash(a) == hash(b)
    assert a != Blend.parse([{"text": "x", "weight": 0.5}, {"text": "y", "weight": 0.5}])
    assert a != Blend.of("x") and Blend.of("x") == Blend.parse("x")
    assert Blend.parse(json.loads(json.dumps(a.to_json()))) == a
    assert Blend.parse(a.to_value()) == a
    assert len({a, b, Blend.of("x")}) == 2


@pytest.mark.parametrize(
    "value, message",
    [
        (3, "prompt: must be a string or a list of {text, weight}, got 3"),
        ([], "prompt: must hold at least one {text, weight}"),
        ([{"text": "a"}] * (MAX_PARTS + 1), f"prompt: at most {MAX_PARTS} texts in a blend, got 5"),
        (["a"], "prompt[0]: must be {text, weight}, got 'a'"),
        ([{"text": "a"}, {"text": "b", "weight": -1}], "prompt[1].weight: must be > 0, got -1"),
        ([{"text": "a", "weight": 0}], "prompt[0].weight: must be > 0, got 0"),
        ([{"text": "a", "weight": float("nan")}], "prompt[0].weight: must be > 0, got nan"),
        ([{"text": "a", "weight": True}], "prompt[0].weight: must be a number, got True"),
        ([{"text": "a", "weight": "1"}], "prompt[0].weight: must be a number, got '1'"),
        ([{"weight": 1}], "prompt[0].text: missing"),
        ([{"text": "a", "mood": 1}], "prompt[0].mood: unknown key (known: text, weight)"),
        ([{"text": 5}], "prompt[0].text: must be a string, got 5"),
        ([{"text": "a"}, {"text": "b\nc"}], "prompt[1].text: must not contain control characters"),
        ([{"text": "a b"}, {"text": " a  b "}], "prompt[1].text: 'a b' is already prompt[0]"),
        ("x" * 2001, "prompt: too long (2001 characters, at most 2000)"),
    ],
)
def test_bad_blends_name_the_part(value, message):
    with pytest.raises(ValueError) as e:
        Blend.parse(value)
    assert str(e.value).startswith(message)


def test_limits_come_from_the_caller():
    with pytest.raises(ValueError, match=r"^stations\[0\].prompt\[0\].text: too long \(5 "):
        Blend.parse([{"text": "abcde"}], where="stations[0].prompt", max_length=4)
    with pytest.raises(ValueError, match="at most 2 texts"):
        Blend.parse([{"text": "a"}, {"text": "b"}, {"text": "c"}], max_parts=2)
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        Blend.parse("   ", allow_empty=False)
    assert clean_text("a\u3000 b") == "a b"  # unicode spaces collapse too
    with pytest.raises(ValueError, match="control characters"):
        clean_text("a\u2028b")


def test_glide_goes_linearly_through_the_union_and_ends_on_the_new_blend():
    old = Blend.parse([{"text": "jazz", "weight": 0.6}, {"text": "rain", "weight": 0.4}])
    new = Blend.parse([{"text": "rain", "weight": 0.5}, {"text": "birds", "weight": 0.5}])
    start = Blend.glide(old, new, 0.0)
    # the new text is there from the start, at weight 0: its row is prefilled before it is heard
    assert start.parts == (("jazz", 0.6), ("rain", 0.4), ("birds", 0.0))
    mid = Blend.glide(old, new, 0.5)
    assert dict(mid.parts) == pytest.approx({"jazz": 0.3, "rain": 0.45, "birds": 0.25})
    assert mid.dominant == "rain"
    quarter = Blend.glide(old, new, 0.25)
    assert dict(quarter.parts) == pytest.approx({"jazz": 0.45, "rain": 0.425, "birds": 0.125})
    end = Blend.glide(old, new, 1.0)
    assert end == new and "jazz" not in end.texts  # texts at weight 0 leave at t = 1
    assert math.fsum(Blend.glide(old, new, 0.3).weights) == pytest.approx(1.0)
    assert len(Blend.glide(old, new, 0.99).parts) == 3
    with pytest.raises(ValueError, match="progress"):
        Blend.glide(old, new, 1.5)


def test_glide_between_equal_blends_changes_nothing():
    b = Blend.parse([{"text": "a", "weight": 1}, {"text": "b", "weight": 3}])
    for t in (0.0, 0.3, 1.0):
        assert Blend.glide(b, b, t) == b
