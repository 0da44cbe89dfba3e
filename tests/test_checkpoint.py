"""trimtune.checkpoint (issue 23): output folders under one rule (a non-empty folder is refused,
--overwrite is staged and swapped in), deterministic files, and a free-space check before a large
write."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trimtune.checkpoint import (holds_run, read_json, run_folder, staging_path,
                                 torch_save_atomic, write_json, write_safetensors)
from trimtune.errors import TrimtuneError


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- deterministic


def test_safetensors_metadata_is_written_in_one_order(tmp_path):
    # the safetensors writer keeps metadata in a hash map: a new order on (nearly) every call
    meta = {f"key_{c}": f"value {c}" for c in "fedcba"}
    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3)}
    files = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for f in files:
        write_safetensors(f, tensors, metadata=meta)
    assert len({digest(f) for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b.weight"), tensors["b.weight"])


def test_json_sets_are_sorted_lists(tmp_path):
    write_json(tmp_path / "a.json", {"b": {"qkv", "fc1", "proj", "fc2"}, "a": 1})
    assert read_json(tmp_path / "a.json") == {"a": 1, "b": ["fc1", "fc2", "proj", "qkv"]}


# ----------------------------------------------------------------------------- free space

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def tiny_disk(monkeypatch):
    """A file system with 1 KiB free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1024, 1024))


def test_a_write_too_large_for_the_free_space_is_refused_in_one_line(tmp_path, tiny_disk):
    target = tmp_path / "model" / "model.safetensors"
    target.parent.mkdir()
    with pytest.raises(TrimtuneError) as e:
        write_safetensors(target, {"w": torch.zeros(1000, 100)})
    msg = str(e.value)
    assert "\n" not in msg and str(target.parent) in msg and "not enough free space" in msg
    assert "465,536 bytes" in msg  # 400,000 of tensors + 64 KiB of header
    assert "1.0 KiB are free" in msg and "free some space" in msg
    assert not list(target.parent.iterdir())  # nothing written, not even a temporary file
    with pytest.raises(TrimtuneError, match="state.pt: it needs about"):
        torch_save_atomic({"model": {"w": torch.zeros(10)}}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(TrimtuneError, match=rf"space in {tmp_path / 'm'} to write"):
        with run_folder(tmp_path / "m", whole=True) as work:  # the folder, not its staging
            write_safetensors(work / "model.safetensors", {"w": torch.zeros(1000)})
    assert not (tmp_path / "m").exists() and not staging_path(tmp_path / "m").exists()


# ----------------------------------------------------------------------------- output folders


def test_any_entry_makes_a_folder_non_empty(tmp_path):
    assert not holds_run(tmp_path / "new") and not holds_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert holds_run(tmp_path)
    assert not holds_run(tmp_path, markers=("run.json",))  # the loop's own, narrower rule


def test_the_users_own_files_are_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrimtuneError, match=r"is not empty \(it holds notes.txt\): pass "
                                            r"--overwrite"):
        with run_folder(out, what="model", whole=True):
            pass
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with run_folder(out, overwrite=True, whole=True, what="model") as work:
        assert work == staging_path(out)
        (work / "model.safetensors").write_text("new")
        assert (out / "notes.txt").is_file()  # swapped in only at the end
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_a_model_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with run_folder(out, whole=True) as work:
            (work / "half").write_text("x")
            raise RuntimeError("crash")
    assert not out.exists() and not staging_path(out).exists()
    with pytest.raises(KeyboardInterrupt):
        with run_folder(out, whole=True) as work:
            raise KeyboardInterrupt
    assert not os.listdir(tmp_path)  # a staging folder without a checkpoint is not kept
