"""Callbacks of the one loop that know nothing about a method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import write_json, write_safetensors
from ..errors import TrimtuneError


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: every trainable parameter and every buffer (an
    adapter's state, e.g. SNELL's per-unit ``zeroed`` counts, lives in buffers)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


class BestEpoch:
    """Best-validation selection, the one mechanism: after each evaluation (``on_evaluate``)
    keeps a copy of :func:`trainable_state` when ``state.logs[metric]`` improved;
    :meth:`restore` loads it. Its ``state_dict`` is part of every checkpoint, so a resumed run
    selects exactly what an uninterrupted one does. The loop's ``TrainConfig.select_metric``
    is one of these writing ``out_dir/best/`` (``folder``, ``keep=False``).

    Args:
        metric: the ``eval_fn`` result to maximise (``mode="max"``) or minimise.
        folder: also write the best :func:`trainable_state` (``model.safetensors``) and the
            evaluation it came from (``best.json``) there, each time the metric improves.
        keep: hold the best state in memory for :meth:`restore` (False: ``value`` and
            ``folder`` only, no copy of the weights in memory or in the checkpoint).
    """

    def __init__(self, metric: str = "val_acc", mode: str = "max", *,
                 folder: str | Path | None = None, keep: bool = True) -> None:
        if mode not in ("max", "min"):
            raise TrimtuneError(f"mode={mode!r}: use 'max' or 'min'")
        self.metric, self.mode = metric, mode
        self.folder = Path(folder) if folder is not None else None
        self.keep = keep
        self.value: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, state: Any) -> None:
        if self.metric not in state.logs:
            raise TrimtuneError(f"BestEpoch selects on {self.metric!r}, which eval_fn does not "
                                f"return ({sorted(state.logs)}): return it or change metric")
        self.update(state.model, float(state.logs[self.metric]))

    def update(self, model: nn.Module, value: float, metrics: dict | None = None) -> bool:
        """Keep ``model``'s trainable state if ``value`` is the best so far; True if it was.
        ``metrics``: the evaluation written beside it in ``folder/best.json``."""
        better = self.value is None or (value > self.value if self.mode == "max"
                                        else value < self.value)
        if not better:
            return False
        self.value = value
        if self.keep or self.folder is not None:
            best = trainable_state(model)
            if self.keep:
                self.state = best
            if self.folder is not None:
                write_safetensors(self.folder / "model.safetensors", best)
                write_json(self.folder / "best.json", {self.metric: value, **(metrics or {})})
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the best weights and buffers into ``model``; a no-op before any evaluation."""
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)

    def state_dict(self) -> dict:
        return {"value": self.value, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.state = d["value"], d["state"]


# ---- collapse: say so, in one line, with the fix ---------------------------------------------
def _warn(state: Any, message: str) -> None:
    import warnings

    from ..errors import TrainingCollapseWarning

    state.warnings.append(message)
    if state.accelerator is None or state.accelerator.is_main_process:
        warnings.warn(message, TrainingCollapseWarning, stacklevel=3)


def _lower_lr(lr: float) -> str:
    return f"run again with a lower lr (now {lr:g}; e.g. {lr / 3:.2g})"


class LossWatch:
    """Warns once when the logged training loss rises far above where it started: above
    ``factor`` x the first logged value and at least ``margin`` above it (a diverging run; a
    NaN is stopped by the loop itself). Added by the loop to every run."""

    def __init__(self, factor: float = 2.0, margin: float = 0.5) -> None:
        self.factor, self.margin = factor, margin
        self.start: float | None = None
        self.warned = False

    def on_log(self, state: Any) -> None:
        loss = state.logs.get("loss")
        if loss is None or self.warned:
            return
        if self.start is None:
            self.start = float(loss)
            return
        if loss > self.factor * self.start and loss > self.start + self.margin:
            self.warned = True
            _warn(state, f"training loss rose from {self.start:.3g} (first steps) to {loss:.3g} "
                         f"at step {state.step} of {state.total_steps}: the run is diverging; "
                         f"{_lower_lr(state.config.lr)}")

    def state_dict(self) -> dict:
        return {"start": self.start, "warned": self.warned}

    def load_state_dict(self, d: dict) -> None:
        self.start, self.warned = d["start"], d["warned"]


#: how a run that ended at chance is reported (the warning starts with it; benchmarks that
#: select on recorded warnings match it)
NEVER_LEFT_CHANCE = "the run never left chance"


class CollapseWatch:
    """Warns once when the validation ``metric`` (an accuracy) is near ``chance``: within
    ``margin`` x (1 - chance) of it, after having been clearly above it (collapsed) or at the
    last evaluation (never learned). Best-epoch selection still keeps the best epoch.

    Args:
        metric: the ``eval_fn`` result to watch, e.g. ``"val_acc"``.
        chance: the accuracy of guessing, e.g. ``1 / num_classes``.
    """

    def __init__(self, metric: str = "val_acc", chance: float = 0.1, margin: float = 0.15
                 ) -> None:
        self.metric, self.chance, self.margin = metric, chance, margin
        self.best: tuple[float, int] | None = None  # (value, epoch)
        self.warned = False

    def near_chance(self, value: float) -> bool:
        return value - self.chance < self.margin * (1.0 - self.chance)

    def on_evaluate(self, state: Any) -> None:
        v = state.logs.get(self.metric)
        if v is None:
            return
        v, epoch = float(v), state.epoch
        last = state.step >= state.total_steps
        best = self.best
        if best is None or v > best[0]:
            self.best = (v, epoch)
        if self.warned or not self.near_chance(v):
            return
        fix = _lower_lr(state.config.lr)
        if best is not None and not self.near_chance(best[0]):
            self.warned = True
            _warn(state, f"the run collapsed: {self.metric} fell to {v:.3f} at epoch {epoch} "
                         f"(chance {self.chance:.3f}) after {best[0]:.3f} at epoch {best[1]}, "
                         f"which best-epoch selection keeps; {fix}")
        elif last:
            self.warned = True
            _warn(state, f"{NEVER_LEFT_CHANCE}: {self.metric} {v:.3f} at the end (chance "
                         f"{self.chance:.3f}); {fix}, or train longer")

    def state_dict(self) -> dict:
        return {"best": self.best, "warned": self.warned}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.warned = d["best"], d["warned"]


__all__ = ["NEVER_LEFT_CHANCE", "BestEpoch", "CollapseWatch", "LossWatch", "trainable_state"]
