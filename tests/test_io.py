"""The one atomic write (`slimrarts._io`): a failing write leaves the old file and no temporary file."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from slimrarts._io import atomic_file, atomic_write, is_temp_name
from slimrarts.engine.checkpoint import save_atomic


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is created
    atomic_write(path, "first ✓")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["a.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    atomic_write(path, "α")
    assert path.read_text(encoding="utf-8") == "α"


def test_a_failing_write_keeps_the_old_content_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="half way"), atomic_file(path) as fh:
        fh.write(b"new, but only half")
        fh.flush()
        assert [n for n in os.listdir(tmp_path) if is_temp_name(n)]  # the new bytes went to a temporary file
        raise RuntimeError("half way")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_a_failing_first_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "a.txt", 3)  # not bytes or text
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_that_fails_to_serialise_keeps_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    assert len(synced) == 1  # checkpoints reach the disk before the rename
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    atomic_write(tmp_path / "plain.txt", "x")
    assert len(synced) == 1  # plain writes do not fsync unless asked


def test_is_temp_name():
    assert is_temp_name(".report.json.k2j3.tmp") and not is_temp_name("report.json") and not is_temp_name(".hidden")
