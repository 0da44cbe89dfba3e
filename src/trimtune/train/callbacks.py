"""Callbacks of the one loop that know nothing about a method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import TrimtuneError


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: every trainable parameter and every buffer (an
    adapter's state, e.g. SNELL's per-unit ``zeroed`` counts, lives in buffers)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


class BestEpoch:
    """Best-validation selection: after each evaluation (``on_evaluate``) keeps a copy of
    :func:`trainable_state` when ``state.logs[metric]`` improved; :meth:`restore` loads it.
    Its ``state_dict`` is part of every checkpoint, so a resumed run selects exactly what an
    uninterrupted one does.

    Args:
        metric: the ``eval_fn`` result to maximise (``mode="max"``) or minimise.
    """

    def __init__(self, metric: str = "val_acc", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise TrimtuneError(f"mode={mode!r}: use 'max' or 'min'")
        self.metric, self.mode = metric, mode
        self.value: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, state: Any) -> None:
        if self.metric not in state.logs:
            raise TrimtuneError(f"BestEpoch selects on {self.metric!r}, which eval_fn does not "
                                f"return ({sorted(state.logs)}): return it or change metric")
        self.update(state.model, float(state.logs[self.metric]))

    def update(self, model: nn.Module, value: float) -> None:
        better = self.value is None or (value > self.value if self.mode == "max"
                                        else value < self.value)
        if better:
            self.value, self.state = value, trainable_state(model)

    def restore(self, model: nn.Module) -> None:
        """Load the best weights and buffers into ``model``; a no-op before any evaluation."""
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)

    def state_dict(self) -> dict:
        return {"value": self.value, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.state = d["value"], d["state"]


__all__ = ["BestEpoch", "trainable_state"]
