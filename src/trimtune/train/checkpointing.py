"""Training checkpoints: one file, written atomically, holding everything resume needs.

``out_dir/checkpoint/state.pt`` (``torch.save`` through
:func:`trimtune.checkpoint.torch_save_atomic`) holds the unwrapped model state dict,
optimizer, scheduler, EMA, callbacks, the RNG states (python, numpy, torch, cuda) and the
position (step, epoch, batch within the epoch).
``out_dir/checkpoint/meta.json`` repeats the position for humans. A crash mid-write never
leaves a half-written file: the previous checkpoint stays until the new one is complete.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CKPT_DIR, CKPT_FILE, torch_save_atomic, write_json
from ..errors import TrimtuneError


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_DIR / CKPT_FILE


def save_checkpoint(out_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (see module docstring) to ``out_dir/checkpoint/state.pt``."""
    path = checkpoint_path(out_dir)
    torch_save_atomic(state, path)
    write_json(path.parent / "meta.json",
               {k: state[k] for k in ("step", "epoch", "batch", "total_steps") if k in state})
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a file, or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path) if (path / CKPT_DIR).is_dir() else path / CKPT_FILE
    if not path.is_file():
        raise TrimtuneError(f"no training checkpoint at {path}: pass the run's out_dir, or set "
                            f"resume=False to start from scratch")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for damaged files
        raise TrimtuneError(f"{path} is damaged ({e}); delete it and set resume=False") from e


def numerics(device: torch.device | str | None = None) -> dict[str, Any]:
    """What, besides the seed and the settings, decides a run's bits: torch's version, the
    device, torch's CPU thread count and the ``TRIMTUNE_COMPILE`` setting (the compiled and
    eager SNELL paths sum in different orders). Stored in every checkpoint and in run.json."""
    import os

    return {"torch": torch.__version__, "device": str(device or "cpu"),
            "threads": torch.get_num_threads(),
            "compile": os.environ.get("TRIMTUNE_COMPILE", "auto")}


def numerics_note(saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """One line when a resumed run computes under other numerics than its checkpoint (it then
    continues correctly but not bit for bit as the uninterrupted run would), else None."""
    if not saved:
        return None
    diff = [f"{k} {now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in sorted(saved)
            if saved.get(k) != now.get(k)]
    if not diff:
        return None
    fix = []
    if saved.get("threads") != now.get("threads"):
        fix.append(f"--threads {saved['threads']} (TrainConfig(threads={saved['threads']}))")
    if saved.get("compile") != now.get("compile"):
        fix.append(f"TRIMTUNE_COMPILE={saved['compile']}")
    return ("resuming under other numerics: " + ", ".join(diff) + "; the run continues but "
            "will not be bit-identical to an uninterrupted one" +
            (f": resume with {' and '.join(fix)} to replay it exactly" if fix else ""))
