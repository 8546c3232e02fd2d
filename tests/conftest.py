"""Shared fixtures: tiny random-weight models built once per session, and real external parts
(ffmpeg, icecast2, chromium) that skip on a developer's box without them but fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external program; skips without it, except in CI where it must be there."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from engine.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-mono")
    build_tiny_model(path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory) -> str:
    from engine.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-stereo")
    build_tiny_model(path, stereo=True, seed=1)
    return str(path)
