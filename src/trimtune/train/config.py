"""Configuration, live state and result of :func:`trimtune.train.fit`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from ..errors import TrimtuneError


@dataclass
class TrainConfig:
    """Everything the one training loop needs; method-specific knobs live in the objective.

    ``batch_size`` is per process: the global batch is ``batch_size * num_processes *
    grad_accum``. The learning-rate schedule (warm-up + cosine to ``min_lr``) always spans
    ``epochs`` full epochs; ``max_steps`` only stops the run early (with a checkpoint), so a
    stopped run resumes onto exactly the schedule of an uninterrupted one.

    ``out_dir`` is never written over by accident (left None, every run gets a new numbered
    folder ``runs/train-001``, ``-002``...): a folder that already holds a run is
    refused unless ``resume=True`` (continue it; every setting that changes the result must
    equal the checkpoint's, see :meth:`result_settings`) or ``overwrite=True`` (replace it;
    the new run is written beside it and swapped in only once it finished). ``resume="auto"``
    resumes when a checkpoint exists and starts fresh otherwise; it is never the default.

    Same ``seed``, same bits — on the same torch version, device, ``TRIMTUNE_COMPILE`` path and
    number of CPU ``threads``: the thread count changes the order of floating-point sums, and
    SNELLA's mask competition turns last-bit differences into other masks (1 vs 2 threads:
    393 of 507 adapter tensors differ after 8 steps). The run records these in its checkpoint
    (:func:`trimtune.train.checkpointing.numerics`); a resume under other ones warns.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    clip_grad: float | None = None
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema: float | None = None  # EMA decay (timm ModelEmaV3), None = off
    seed: int = 0
    out_dir: str | Path | None = None  # None: a new numbered folder runs/train-NNN per run
    ckpt_every: int | None = None  # optimizer steps between checkpoints; None = final only
    log_every: int = 10
    num_workers: int = 0
    threads: int | None = None  # CPU threads of torch for the run; None: torch's default
    max_steps: int | None = None
    resume: bool | Literal["auto"] = False
    overwrite: bool = False
    progress: bool = True
    select_metric: str | None = None  # e.g. "val_acc": keep the best trainable weights in best/
    select_mode: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrimtuneError(msg)

        need(self.epochs >= 1, f"epochs={self.epochs}: set epochs to 1 or more")
        need(self.batch_size >= 1, f"batch_size={self.batch_size}: set batch_size to 1 or more")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum}: set grad_accum to 1 or more")
        need(self.lr > 0, f"lr={self.lr}: set a positive learning rate, e.g. lr=1e-4")
        need(self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision={self.mixed_precision!r}: use 'no', 'fp16' or 'bf16'")
        need(self.resume in (True, False, "auto"),
             f"resume={self.resume!r}: use True, False or 'auto'")
        need(self.ema is None or 0.0 < self.ema < 1.0,
             f"ema={self.ema}: give an EMA decay in (0, 1), e.g. 0.9998, or None")
        need(self.max_steps is None or self.max_steps >= 1,
             f"max_steps={self.max_steps}: set it to 1 or more, or None")
        need(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             f"threads={self.threads!r}: give a positive number of CPU threads, e.g. 2, or None")
        need(self.select_mode in ("max", "min"),
             f"select_mode={self.select_mode!r}: use 'max' or 'min'")
        need(not (self.resume == "auto" and self.overwrite),
             "resume='auto' with overwrite=True: use resume=True with overwrite=True to "
             "continue an interrupted overwrite, or overwrite=True alone to start it again")
        self.out_dir = None if self.out_dir is None else Path(self.out_dir)

    #: fields that do not change what is learned (where, how often, how it is shown)
    NOT_RESULT = ("out_dir", "ckpt_every", "log_every", "num_workers", "threads", "max_steps",
                  "resume", "overwrite", "progress")

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the trained weights (lr, epochs, batch size, seed...):
        stored in every checkpoint and compared on resume."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self.NOT_RESULT}


@dataclass
class TrainState:
    """What callbacks see: ``model`` is the unwrapped model, ``step`` the optimizer steps done."""

    model: nn.Module
    accelerator: Any
    optimizer: Any
    config: TrainConfig
    out_dir: Path
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    logs: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False  # a callback may set it: the loop checkpoints and returns
    warnings: list[str] = field(default_factory=list)  # collapse notes (one line each)


@dataclass
class TrainResult:
    """Final metrics (last logs + last eval), per-log history, and where things were written."""

    metrics: dict[str, float]
    history: list[dict[str, Any]]
    step: int
    epoch: int
    out_dir: Path
    checkpoint: Path | None = None
    best: Path | None = None
    metrics_file: Path | None = None
    stopped_early: bool = False
    ema: nn.Module | None = None  # the timm ModelEmaV3 (``.module`` is the averaged model)
    warnings: list[str] = field(default_factory=list)  # e.g. the loss rose / fell to chance
