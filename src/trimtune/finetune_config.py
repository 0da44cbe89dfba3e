"""What a fine-tuning run is: :class:`FinetuneConfig` (method + train + task settings), the
tuner config and options it gives its method and the rank check (both the method's own, asked
of :mod:`trimtune.tuners.registry`), :func:`prepare` (attach the
method, return its callbacks) and :class:`FinetuneResult`.

Below :mod:`trimtune.runs` (which rebuilds a run's method from run.json with :func:`prepare`) and
:mod:`trimtune.tasks` (which trains it): neither is imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import TrimtuneError, renamed
from .names import METHODS
from .train import TrainConfig
from .tuners import registry


@renamed(rank="r", sparsity="target_sparsity")
@dataclass
class FinetuneConfig:
    """What to tune and how. ``train`` holds the loop's settings (epochs, lr, batch size...).

    ``r`` is the rank (of SNELL / SNELLA's factors, LoRA / DoRA's; AdaLoRA's target average),
    as in PEFT and :class:`~trimtune.tuners.SnellaConfig`. Sparsity always means the fraction
    of an update's entries that are zero: ``target_sparsity`` is that fraction at the end of
    training (SNELL: fixed from the start; SNELLA: where its budget schedule ends, starting from
    ``init_sparsity``); masked-sparse trains a ``density`` = 1 - sparsity of each weight
    (default ``1 - target_sparsity``). ``rank=`` / ``sparsity=`` are the old spellings
    (a DeprecationWarning, for one release).

    ``target_modules`` selects the adapted layers for every method by the one rule of
    :mod:`trimtune.tuners.targets` (PEFT's: a regex string over whole names, a list of names /
    suffixes, or ``"all-linear"``); None: the model family's default."""

    method: str = "snella"
    r: int = 8
    kernel: str | None = None  # default: mixture for snella, piecewise for snell
    target_sparsity: float = 0.7  # fraction of each update zeroed at the end (see above)
    init_sparsity: float = 0.0  # snella: fraction zeroed at the start of the schedule
    density: float | None = None  # masked-sparse: fraction of each weight that trains
    target_modules: str | list[str] | None = None  # every method: which layers (see above)
    protocol: str = "vtab"  # vtab: resize only; fgvc: random-resized crop + flip
    label_smoothing: float = 0.0
    # SNELL / SNELLA regularisation and allocation schedule (trimtune.recipes: "authors" sets
    # 0.1 / 0.1 / 0.1 and an epoch schedule as the released scripts; these are the "fast" ones)
    branch_dropout: float = 0.0  # dropout on the update branch's input (not attn.proj)
    branch_drop_path: float = 0.0  # DropPath on each unit's update (q, k, v independently)
    drop_path_rate: float = 0.0  # backbone stochastic depth (timm's linear decay over blocks)
    schedule_unit: str = "step"  # snella: count the budget schedule in "step"s or "epoch"s
    alloc_interval: int = 1  # snella: reallocate every N schedule units
    t_init: float = 0  # snella: schedule warm-up (count, or fraction of the run if < 1)
    t_final: float = 0  # snella: final phase with the allocation fixed
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=10))
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    # what is learned: "classification" or "segmentation" (trimtune.segment: decode head,
    # per-pixel loss, mIoU; options head="linear"|"linear4", reduce_zero_label)
    task: str = "classification"
    task_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .segment import check_options
        self.task_options = check_options(self.task, dict(self.task_options or {}))
        if self.method not in METHODS:
            raise TrimtuneError(f"unknown method {self.method!r}; choose one of "
                                f"{', '.join(METHODS)}")
        if self.protocol not in ("vtab", "fgvc"):
            raise TrimtuneError(f"unknown protocol {self.protocol!r}; choose vtab or fgvc")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise TrimtuneError(f"drop-path rate {self.drop_path_rate} is outside [0, 1): use "
                                "e.g. 0.1 (the authors') or 0")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        tuner_config(self)  # the method's config checks its own fields, now

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (run.json's ``config``); a file written before ``r`` /
        ``target_sparsity`` (``rank`` / ``sparsity``) reads the same, without a warning."""
        d = dict(d)
        for old, new in (("rank", "r"), ("sparsity", "target_sparsity")):
            if old in d and new not in d:
                d[new] = d.pop(old)
        if isinstance(d.get("train"), dict):
            d["train"] = TrainConfig(**d["train"])
        return cls(**d)


def tuner_config(cfg: FinetuneConfig, total_steps: int | None = None) -> Any:
    """What ``cfg.method`` attaches with for this run (its registry entry's ``from_finetune``):
    a :class:`~trimtune.tuners.SnellConfig` / ``SnellaConfig`` for SNELL / SNELLA, keyword
    options for the baselines."""
    return registry.get(cfg.method).from_finetune(cfg, total_steps)


def check_rank(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Refuse a rank above ``min(d_in, d_out)`` of a target layer (a SNELL / SNELLA unit, a
    LoRA / DoRA / AdaLoRA linear): the method's own check (its registry entry's ``check``)."""
    check = registry.get(cfg.method).check
    if check is not None:
        check(model, cfg)


def prepare(model: nn.Module, cfg: FinetuneConfig, *, total_steps: int | None = None
            ) -> tuple[nn.Module, list]:
    """Attach ``cfg.method`` (the registry's attach) and return ``(model, callbacks)``. A model
    that already has a method attached (``trimtune.attach`` first) is tuned as it is. A rank
    above a target's ``min(d_in, d_out)`` is refused first (:func:`check_rank`)."""
    attached = registry.method_of(model)
    if attached is None:
        check_rank(model, cfg)
        made = tuner_config(cfg, total_steps)
        if isinstance(made, dict):
            registry.attach(model, cfg.method, **made)
        else:
            registry.attach(model, made)
    elif attached != cfg.method:
        raise TrimtuneError(f"the model already has {attached} attached but the config says "
                            f"method={cfg.method!r}: pass FinetuneConfig(method={attached!r}) "
                            "or a plain model")
    return model, registry.callbacks(model)


@dataclass
class FinetuneResult:
    model: nn.Module
    out_dir: Path | None
    best: dict | None
    test: dict | None
    history: list
    warnings: list = field(default_factory=list)  # collapse notes of the run (one line each)


__all__ = ["FinetuneConfig", "FinetuneResult", "check_rank", "prepare", "tuner_config"]
