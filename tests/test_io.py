"""Atomic writes: success replaces the file, failure keeps the old one and leaves no temporary file."""

from __future__ import annotations

import os

import pytest

from monai_du.io import atomic_write, write_text_atomic


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "state.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as tmp:
            tmp.write_text("half of the second")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.txt"]


def test_write_text_atomic_writes_utf8(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "note.json", "âge\n")
    assert path.read_bytes() == "âge\n".encode()
