"""Inference latency, measured side by side (median of repeats after warm-up)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .counts import _input_size


@torch.inference_mode()
def latency(model: nn.Module, batch_size: int = 1, reps: int = 5, warmup: int = 2,
            input_size: tuple[int, int, int] | None = None) -> dict:
    """Median seconds per forward of ``batch_size`` images and images per second."""
    input_size = tuple(input_size or _input_size(model))
    p = next(model.parameters())
    x = torch.randn(batch_size, *input_size, device=p.device, dtype=p.dtype)
    model.eval()
    times = []
    for i in range(warmup + reps):
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch_size": batch_size, "seconds": med, "images_per_s": batch_size / med}
