"""Atomic file writes shared by every writer in trimtune, and the guard of run folders.

A crash (or Ctrl-C) never leaves a half-written file behind: data goes to a temporary file
in the same folder, is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX and Windows). A temporary file left by a killed process (``kill -9``) is
removed the next time a run starts in that folder (:func:`clean_stale`).

Run folders (:func:`run_folder`): a folder that already holds a run is never written into
unless the caller resumes it or asked to overwrite it; an overwriting run is written into a
hidden sibling folder and swapped in only when it finished, so a failing or interrupted
re-run leaves the previous run exactly as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import TrimtuneError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TrimtuneError(f"no space left on the device writing {path}: free some space "
                                f"or choose another output folder ({path} was not "
                                "replaced)") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise TrimtuneError(f"{path} not found: is this a folder written by trimtune?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrimtuneError(
            f"{path} is not valid JSON ({e}); the file is damaged: re-create it") from e


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise TrimtuneError(f"{path} not found")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises several error types for damaged files
        raise TrimtuneError(
            f"{path} is damaged or not a safetensors file ({e}); re-create it") from e


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB chunks): the identity of a base model."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------- run folders

#: files and folders whose presence means "a run (or a saved model) lives here"
RUN_MARKERS = ("run.json", "checkpoint", "metrics.jsonl", "results.json", "trimtune.json",
               "adapter", "model")
STAGING_SUFFIX = ".staging"


def new_run_dir(root: str | os.PathLike = "runs", prefix: str = "train") -> Path:
    """The first free numbered folder ``root/prefix-001``, ``-002``... (the default of a run
    whose ``out_dir`` was not given: a new run never lands in an old run's folder). Under
    several processes (DDP) give ``out_dir`` explicitly: the processes must agree on it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrimtuneError("out_dir is not set: give it explicitly when training on several "
                            "processes (they must all write to the same folder)")
    root = Path(root)
    n = 1
    while (root / f"{prefix}-{n:03d}").exists() or staging_path(root / f"{prefix}-{n:03d}").exists():
        n += 1
    return root / f"{prefix}-{n:03d}"


def staging_path(out: str | os.PathLike) -> Path:
    """The hidden sibling an overwriting run is written into: ``parent/.NAME.staging``."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def replaced_path(out: str | os.PathLike) -> Path:
    """Where the previous run sits for a moment while an overwriting run is swapped in."""
    out = Path(out)
    return out.parent / f".{out.name}.replaced"


def holds_run(out: str | os.PathLike, markers: tuple[str, ...] = RUN_MARKERS) -> bool:
    """Whether ``out`` already holds something trimtune wrote (a run, a checkpoint, a model)."""
    out = Path(out)
    return out.is_dir() and any((out / m).exists() for m in markers)


def check_writable(out: str | os.PathLike) -> Path:
    """Refuse, with one line, an output folder that cannot be written: an existing file, a
    read-only folder, a parent that is a file. Creates nothing (the nearest existing folder is
    probed). Call it before anything slow (loading a model, reading data)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrimtuneError(f"output folder {out} is an existing file: choose a folder path "
                            "(e.g. runs/NAME)")
    base = out
    while not base.exists() and base != base.parent:  # probe the nearest existing folder:
        base = base.parent  # nothing is created until the run really starts
    if not base.is_dir():
        raise TrimtuneError(f"output folder {out} is inside {base}, an existing file: choose "
                            "a folder path (e.g. runs/NAME)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise TrimtuneError(f"output folder {out} is not writable ({why}): choose another "
                            "folder or fix its permissions") from e
    return out


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed process left behind in ``out``: ``.NAME.XXXX.tmp`` files of
    :func:`atomic_path` (anywhere below ``out``) and an unfinished overwrite staging folder.
    Returns what was removed. Only call it when no other process writes into ``out``."""
    out = Path(out)
    gone: list[Path] = []
    old = replaced_path(out)
    if old.is_dir():  # killed between the two renames of a swap: keep what was complete
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)
        gone.append(old)
    stage = staging_path(out)
    if stage.is_dir():
        shutil.rmtree(stage, ignore_errors=True)
        gone.append(stage)
    if out.is_dir():
        for tmp in out.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                gone.append(tmp)
    return gone


def refuse_existing(out: str | os.PathLike, what: str = "run") -> TrimtuneError:
    return TrimtuneError(
        f"{out} already holds a {what}: pass --overwrite (overwrite=True) to replace it, "
        f"--resume (resume=True) to continue it, or choose another output folder")


@contextmanager
def run_folder(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
               main: bool = True, markers: tuple[str, ...] = RUN_MARKERS) -> Iterator[Path]:
    """The folder a run writes into; see the module docstring.

    * ``out`` new or empty, or ``resume``: yields ``out`` itself (written in place; an
      interrupted run leaves its checkpoint there to resume from).
    * ``out`` holds a run and neither ``resume`` nor ``overwrite``: raises, touching nothing.
    * ``overwrite``: yields the empty staging sibling; on success the previous ``out`` is
      replaced by it (rename, rename, delete); on any error or interrupt the staging folder
      is deleted and ``out`` is left exactly as it was.

    ``main=False`` (other DDP processes) yields the same path and writes nothing.
    ``markers``: the names whose presence means "holds a run" (default :data:`RUN_MARKERS`).
    """
    out = Path(out)
    if not main:
        yield staging_path(out) if overwrite and not resume and holds_run(out, markers) else out
        return
    check_writable(out)
    clean_stale(out)
    if resume or not holds_run(out, markers):
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    if not overwrite:
        raise refuse_existing(out)
    stage = staging_path(out)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = replaced_path(out)
    os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
