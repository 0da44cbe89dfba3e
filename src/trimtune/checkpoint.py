"""Atomic file writes shared by every writer in trimtune.

A crash (or Ctrl-C) never leaves a half-written file behind: data goes to a temporary file
in the same folder, is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
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


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
