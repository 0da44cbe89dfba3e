"""Atomic file writes shared by every writer in trimtune, and the guard of run folders.

A crash (or Ctrl-C) never leaves a half-written file behind: data goes to a temporary file
in the same folder, is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX and Windows). A temporary file left by a killed process (``kill -9``) is
removed the next time a run starts in that folder (:func:`clean_stale`).

Output folders (:func:`run_folder`), one rule for every command that writes a model or a run
(compress, distill, merge, export, finetune, quickstart):

* a folder that is not empty (a run, a model, or the user's own files) is never written into
  unless the caller resumes the run in it or asked to overwrite it; the CLI checks this
  before loading anything (one line naming ``--overwrite``, exit code 2);
* an overwriting write goes into a hidden sibling, ``parent/.NAME.staging``, swapped in only
  when it finished (rename, rename, delete), so a failing or interrupted re-write leaves the
  previous folder exactly as it was;
* an interrupted (Ctrl-C, SIGTERM) overwriting *training* run keeps its staging folder when it
  holds a checkpoint (``checkpoint/state.pt``): ``--overwrite --resume`` (``overwrite=True,
  resume=True``) continues it there and swaps it in when it finishes; ``--overwrite`` alone
  starts again (the kept staging folder is replaced, with a warning). A staging folder without
  a checkpoint (a model write, a run killed before its first checkpoint) is deleted on
  interrupt, and by :func:`clean_stale` when found later; one with a checkpoint is only ever
  removed by ``--overwrite`` or by its own swap;
* a model folder (``whole=True``) is staged even when new: it appears complete or not at all.

Every large write (:func:`write_safetensors`, :func:`torch_save_atomic`) first compares the
bytes it needs (estimated from the tensors) with the free space of the target's file system
(:func:`check_space`) and refuses with one line instead of failing half-way.

The same inputs give byte-identical files: JSON keys are sorted (sets written as sorted
lists) and the safetensors metadata is sorted (the safetensors writer orders it at random);
no timestamp is written into a weights file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import RunInterrupted, TrimtuneError


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


def _json_default(o: Any) -> Any:
    """JSON for what ``json`` cannot write: sets as sorted lists (their order depends on the
    process's hash seed), anything else as its ``str``."""
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=lambda v: (type(v).__name__, str(v)))
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, deterministic JSON: sorted keys, sets as sorted lists."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


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
    """Atomic, deterministic safetensors file (metadata sorted); refused up front, in one line,
    when the file system has too little free space for it (:func:`check_space`)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_space(path, tensor_bytes(tensors) + 64 * 1024)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header(tmp)


def _sort_header(path: Path) -> None:
    """Rewrite the JSON header of a safetensors file with its ``__metadata__`` sorted by key.

    The safetensors writer keeps the metadata in a hash map, so the same dict is written in a
    different order on every call. The tensor entries (their order fixes the data offsets) are
    kept as written; only the header bytes change, in place, padded with spaces to its length.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # the same keys and values: the same length as the writer's
            f.seek(8)
            f.write(new.ljust(n, b" "))
            return
    data = path.read_bytes()[8 + n:]  # not expected: a header that grew; rewrite the file
    new = new.ljust(-(-len(new) // 8) * 8, b" ")
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts / lists / tuples): what a write of ``obj``
    needs on disk, give or take a header."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_space(path: str | os.PathLike, need: int) -> None:
    """Refuse, with one line naming the folder, the bytes needed and free and the fix, a write
    of ``need`` bytes to ``path`` that its file system has no room for. The atomic write keeps
    the previous file until the new one is complete, so the whole size is needed."""
    folder = Path(path).parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:  # no statistics for this file system: let the write itself tell
        return
    if need > free:
        # name the folder the user chose, not its hidden staging sibling (same file system)
        folder = Path(*[p[1:-len(STAGING_SUFFIX)] if p.startswith(".") and
                        p.endswith(STAGING_SUFFIX) else p for p in folder.parts])
        raise TrimtuneError(
            f"not enough free space in {folder} to write {Path(path).name}: it needs about "
            f"{_size(need)} ({need:,} bytes), {_size(free)} are free; free some space or "
            "choose an output folder on another disk (nothing was written)")


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
    """``torch.save`` through :func:`atomic_path`, after :func:`check_space`."""
    check_space(path, tensor_bytes(obj) + 1024 * 1024)
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
    while any(p.exists() for p in (root / f"{prefix}-{n:03d}",
                                   staging_path(root / f"{prefix}-{n:03d}"))):
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


#: a folder holding this file (``train.checkpointing`` writes it) is a resumable run
CKPT_DIR, CKPT_FILE = "checkpoint", "state.pt"


def resumable(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a training checkpoint a run can resume from."""
    return (Path(folder) / CKPT_DIR / CKPT_FILE).is_file()


def holds_run(out: str | os.PathLike, markers: tuple[str, ...] | None = None) -> bool:
    """Whether ``out`` is a folder something must not be written into: with ``markers=None``
    (the rule of every command) any entry counts, the user's own files too; with ``markers``,
    only those names (e.g. the training loop's own files, written into a folder its caller
    prepared)."""
    out = Path(out)
    if not out.is_dir():
        return False
    if markers is None:
        return any(True for _ in out.iterdir())
    return any((out / m).exists() for m in markers)


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
    :func:`atomic_path` (anywhere below ``out``, and below a kept staging folder), an
    unfinished swap (the previous folder is put back), and a staging folder that holds no
    checkpoint. A staging folder with a checkpoint is an interrupted ``--overwrite`` run that
    ``--overwrite --resume`` continues: it is kept. Returns what was removed. Only call it
    when no other process writes into ``out``."""
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
    if stage.is_dir() and not resumable(stage):
        shutil.rmtree(stage, ignore_errors=True)
        gone.append(stage)
    for folder in (out, stage):
        if folder.is_dir():
            for tmp in folder.rglob(".*.tmp"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    gone.append(tmp)
    return gone


def _entries(out: Path) -> str:
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return ", ".join(names[:2]) + more


def refuse_existing(out: str | os.PathLike, what: str = "run", *, resume: bool = True,
                    markers: tuple[str, ...] = RUN_MARKERS) -> TrimtuneError:
    """The one-line refusal of a non-empty output folder (it names ``--overwrite``)."""
    out = Path(out)
    if holds_run(out, markers):
        have = f"{out} already holds a {what}"
        how = "to replace it"
    else:
        have = f"{out} is not empty (it holds {_entries(out)})"
        how = "to replace the folder and everything in it"
    cont = ", --resume (resume=True) to continue it" if resume else ""
    return TrimtuneError(f"{have}: pass --overwrite (overwrite=True) {how}{cont}, or choose "
                         "another output folder")


def check_output(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 markers: tuple[str, ...] | None = None, what: str = "run",
                 can_resume: bool = True) -> Path:
    """The one rule of every command that writes a model or a run folder, checked before
    anything slow (loading a model or data) and again by :func:`run_folder`: ``out`` is a
    writable folder path; a non-empty ``out`` needs ``overwrite`` (or ``resume``); ``overwrite``
    with ``resume`` needs an interrupted overwrite kept beside ``out``. Raises one line."""
    out = Path(out)
    if holds_run(out, markers) and not (resume or overwrite):
        raise refuse_existing(out, what, resume=can_resume)
    check_writable(out)
    if overwrite and resume and not resumable(staging_path(out)):
        raise TrimtuneError(
            f"--overwrite --resume (overwrite=True, resume=True) continues an interrupted "
            f"--overwrite run kept in {staging_path(out)}, and there is none: drop --resume to "
            f"start the overwrite again, or drop --overwrite to continue the run in {out}")
    return out


def _swap(stage: Path, out: Path) -> None:
    """Put the finished ``stage`` in place of ``out`` (rename, rename, delete)."""
    if not out.exists():
        os.replace(stage, out)
        return
    old = replaced_path(out)
    os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _staged_interrupt(e: RunInterrupted, out: Path, stage: Path, kept: bool,
                      what: str) -> RunInterrupted:
    """What an interrupted overwriting write left, and how to go on."""
    name = signal.Signals(e.signum).name
    step = getattr(e, "step", None)
    at = f" at optimizer step {step} of {e.total_steps}" if step is not None else ""
    if kept:
        msg = (f"interrupted by {name}{at}; the previous {what} in {out} is untouched and the new "
               f"one is kept in {stage}: run the same command with --overwrite --resume "
               f"(overwrite=True, resume=True) to continue it (it replaces {out} when it "
               "finishes), or with --overwrite alone to start it again")
    else:
        msg = (f"interrupted by {name}{at}; the previous {what} in {out} is untouched and the new "
               "one was discarded (nothing to resume from): run the command again")
    return RunInterrupted(msg, e.signum, step=step, total_steps=getattr(e, "total_steps", None))


@contextmanager
def run_folder(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
               main: bool = True, markers: tuple[str, ...] | None = None, whole: bool = False,
               what: str = "run") -> Iterator[Path]:
    """The folder a run (or a model) is written into; see the module docstring.

    * ``out`` new or empty, or ``resume``: yields ``out`` itself (written in place; an
      interrupted run leaves its checkpoint there to resume from). With ``whole`` (a model
      folder, never resumed) a new or empty ``out`` is staged like an overwrite instead.
    * ``out`` not empty and neither ``resume`` nor ``overwrite``: raises, touching nothing.
    * ``overwrite``: yields the empty staging sibling; on success the previous ``out`` is
      replaced by it (rename, rename, delete); on an error it is deleted and ``out`` is left
      exactly as it was; on an interrupt (:class:`~trimtune.errors.RunInterrupted`,
      KeyboardInterrupt) it is kept when it holds a checkpoint (the message says how to go
      on), else deleted.
    * ``overwrite`` and ``resume``: continues the interrupted overwrite kept in the staging
      sibling (refused when there is none), swapped in when it finishes.

    ``main=False`` (other DDP processes) yields the same path and writes nothing.
    ``markers``: the names whose presence means "holds a run"; None (default): any entry.
    ``what``: the word for what ``out`` holds in messages ("run", "model", "quickstart").
    """
    out = Path(out)
    stage = staging_path(out)
    if not main:
        if overwrite and resume and resumable(stage):
            yield stage
        elif not resume and (whole or (overwrite and holds_run(out, markers))):
            yield stage
        else:
            yield out
        return
    check_writable(out)
    clean_stale(out)
    check_output(out, resume=resume, overwrite=overwrite, markers=markers, what=what,
                 can_resume=not whole)
    if overwrite and resume:
        pass  # the staging folder holds the run to continue (check_output made sure)
    elif resume or not (whole or holds_run(out, markers)):
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    else:
        if stage.exists():  # an interrupted overwrite kept for --resume: started again instead
            if resumable(stage):
                warnings.warn(f"--overwrite starts again: the interrupted --overwrite run kept "
                              f"in {stage} is deleted (--overwrite --resume would have "
                              "continued it)", stacklevel=3)
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    try:
        yield stage
    except RunInterrupted as e:
        kept = resumable(stage)
        if not kept:
            shutil.rmtree(stage, ignore_errors=True)
        raise _staged_interrupt(e, out, stage, kept, what) from None
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) and resumable(stage)):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap(stage, out)
