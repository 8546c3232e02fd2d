"""engine.extensions: a build lock left by a killed build is removed once stale, never a fresh one."""

import logging
import os
import time
from pathlib import Path

from engine import extensions


def test_a_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not extensions.remove_stale_lock("some_ext")  # a build may be running
    assert lock.exists()
    old = time.time() - extensions.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="engine.extensions"):
        assert extensions.remove_stale_lock("some_ext")
    assert not lock.exists()
    assert "a build of some_ext was interrupted" in caplog.text
    assert not extensions.remove_stale_lock("some_ext")  # no lock: nothing to do


def test_source_digest_follows_names_and_bytes(tmp_path):
    a, b = tmp_path / "a.h", tmp_path / "b.h"
    a.write_text("int x;")
    b.write_text("int y;")
    first = extensions.source_digest(tmp_path, [a, b])
    assert len(first) == 12 and first == extensions.source_digest(tmp_path, [a, b])
    b.write_text("int z;")
    assert extensions.source_digest(tmp_path, [a, b]) != first
    assert extensions.source_digest(tmp_path, [Path(a)]) != extensions.source_digest(tmp_path, [b])


def test_source_digest_differs_between_checkouts(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.h").write_text("int x;")
    one = extensions.source_digest(tmp_path / "one", [tmp_path / "one" / "a.h"])
    two = extensions.source_digest(tmp_path / "two", [tmp_path / "two" / "a.h"])
    assert one != two


def test_a_compile_is_logged_and_a_cached_build_just_loaded(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load", lambda **kw: ("built", kw["name"]))
    caplog.set_level(logging.INFO, logger="engine.extensions")
    assert not extensions.built("some_ext")
    got = extensions.build(
        "some_ext", tmp_path / "x.cpp", [], what="the test kernels", takes="~1 s"
    )
    assert got == ("built", "some_ext")
    assert "building the test kernels (once per machine and source version: ~1 s)" in caplog.text
    caplog.clear()
    (tmp_path / "some_ext").mkdir(exist_ok=True)
    (tmp_path / "some_ext" / "some_ext.so").touch()  # what a finished build leaves
    assert extensions.built("some_ext")
    extensions.build("some_ext", tmp_path / "x.cpp", [], what="the test kernels", takes="~1 s")
    assert "building" not in caplog.text  # a start with the build cached says nothing about it


def test_source_digest_differs_between_torch_installations(tmp_path, monkeypatch):
    import torch

    (tmp_path / "a.h").write_text("int x;")
    here = extensions.source_digest(tmp_path, [tmp_path / "a.h"])
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert extensions.source_digest(tmp_path, [tmp_path / "a.h"]) != here
