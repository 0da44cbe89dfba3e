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


class SegmentationObjective:
    """Per-pixel cross-entropy on ``(images, masks)`` batches: logits (B, K, H, W), masks
    (B, H, W) int64 with ``ignore_index`` (255) left out; the mean over the pixels kept (a
    batch with none kept gives 0, not NaN)."""

    def __init__(self, ignore_index: int = 255, label_smoothing: float = 0.0):
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        keep = y != self.ignore_index
        n = keep.sum().clamp(min=1)
        loss = nn.functional.cross_entropy(logits, y, ignore_index=self.ignore_index,
                                           label_smoothing=self.label_smoothing,
                                           reduction="sum") / n
        acc = ((logits.detach().argmax(1) == y) & keep).sum() / n
        return loss, {"ce": loss.detach(), "train_pixel_acc": acc}


__all__ = ["ClassificationObjective", "SegmentationObjective"]
