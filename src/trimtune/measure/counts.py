"""Parameter and FLOP counts."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        h, w = pe.img_size
        return (3, h, w)
    return tuple(size) if size else (3, 224, 224)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter; 1 MAC = 2 FLOPs)."""
    input_size = tuple(input_size or _input_size(model))
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return int(fc.get_total_flops())
