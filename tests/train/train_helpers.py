"""Tiny models, data and objectives shared by the training-loop tests (and the DDP worker)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def tiny_data(n: int = 64, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Linearly separable random points: ``(x: (dim,), y: int)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def tiny_mlp(dim: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, classes))


def ce_objective(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    return loss, {"ce": loss.detach()}


def run_config(out_dir, batch_size: int):
    """The config shared by the 1-process and 2-process runs of the DDP equivalence test."""
    from trimtune.train import TrainConfig
    return TrainConfig(epochs=2, batch_size=batch_size, lr=1e-2, min_lr=1e-4, warmup_steps=2,
                       weight_decay=0.01, clip_grad=1.0, out_dir=out_dir, progress=False,
                       resume=False, seed=2, log_every=2)
