"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from engine import kernels


@pytest.fixture(scope="module")
def k():
    """Our built CPU kernel module; the test skips (with the reason) where they cannot run."""
    reason = kernels.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CPU kernels cannot run here: {reason}")
    module = kernels.get()
    assert module is not None, "the CPU has the instructions but the kernels did not build (log)"
    return module


@pytest.fixture(scope="module")
def tiny_float32(tiny_model_dir):
    """The tiny mono model loaded in float32 on the CPU (eager steps, no kernels)."""
    from engine import LoadOptions, MusicModel

    return MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", quantize="none")
    )


@pytest.fixture(scope="module")
def int8_model(tiny_model_dir, k):
    """The tiny mono model with int8 weights on our kernels (the CPU default): a row's logits do
    not depend on the rows batched with it."""
    from engine import LoadOptions, MusicModel

    return MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
