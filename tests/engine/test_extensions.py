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
