"""Helpers of the segmentation tests: a tiny ADE20K-layout folder and a tiny timm ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import TINY, tiny_vit  # noqa: F401  (the suite's one tiny ViT; TINY re-exported)
from conftest import tiny_backbone as _tiny_backbone
from PIL import Image

CLASSES = ["background", "square", "disc"]


def canvas(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a bright square (label 1) and a mid-grey disc (label 2)."""
    img = rng.integers(0, 40, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    s = int(rng.integers(6, 12))
    y, x = (int(v) for v in rng.integers(0, size - s, 2))
    img[y:y + s, x:x + s], mask[y:y + s, x:x + s] = 230, 1
    cy, cx = (int(v) for v in rng.integers(6, size - 6, 2))
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
    img[disc], mask[disc] = 140, 2
    return img, mask


def write_seg(root: Path, n_train: int = 16, n_val: int = 8, n_test: int = 0, size: int = 32,
              classes: list[str] | None = CLASSES, seed: int = 0) -> Path:
    """An ADE20K-layout folder of ``canvas`` pairs (PNG images, index-PNG masks)."""
    rng = np.random.default_rng(seed)
    for folder, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        if not n:
            continue
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, mask = canvas(rng, size)
            Image.fromarray(img).convert("RGB").save(root / "images" / folder / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / "annotations" / folder / f"{i:03d}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def tiny_backbone(num_classes: int = 0) -> torch.nn.Module:
    """conftest's tiny ViT with a trimtune architecture record, headless by default."""
    return _tiny_backbone(num_classes)


def tiny_timm() -> torch.nn.Module:
    return tiny_vit(5)
