"""Objectives of the one loop: ``objective(model, batch) -> (loss, logs)``. (Distillation's
objective lives with PELA in :mod:`trimtune.lowrank.distill`.)"""

from __future__ import annotations

import torch
from torch import nn


class ClassificationObjective:
    """Cross-entropy on labelled batches ``(images, labels)``; label smoothing optional."""

    def __init__(self, label_smoothing: float = 0.0):
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        loss = self.loss(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"ce": loss.detach(), "train_acc": acc}


__all__ = ["ClassificationObjective"]
