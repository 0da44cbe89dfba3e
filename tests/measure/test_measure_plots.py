"""Plots stay readable and small at any length: long histories are resampled, figures capped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trimtune.measure.plots import MAX_INCHES, evenly, plot_confusion, plot_curves
from trimtune.tuners.snell.allocator import SnellaAllocator


def test_evenly_keeps_first_and_last_and_at_most_n():
    assert evenly(5, 10) == [0, 1, 2, 3, 4]
    idx = evenly(100_000, 300)
    assert len(idx) <= 300 and idx[0] == 0 and idx[-1] == 99_999 and idx == sorted(set(idx))


def test_sparsity_heat_map_of_50k_steps_is_small(tmp_path):
    """Before: 30 px per optimizer step (MemoryError past ~20,000 steps)."""
    alloc = SnellaAllocator.__new__(SnellaAllocator)  # only the history is needed to plot
    units = [f"blocks.{b}.{n}" for b in range(12) for n in ("q", "k", "v", "proj", "fc1", "fc2")]
    alloc.history = [(s, {u: min(1.0, s / 50_000) for u in units}) for s in range(0, 50_001)]
    alloc.plot_history(tmp_path / "sparsity.png")
    w, h = Image.open(tmp_path / "sparsity.png").size
    assert w <= MAX_INCHES * 120 + 1 and h <= MAX_INCHES * 120 + 1
    # the last column is the last step's allocation (resampling keeps the end)
    alloc.history[-1] = (50_000, {u: 0.0 for u in units})
    alloc.plot_history(tmp_path / "end.png")
    px = np.asarray(Image.open(tmp_path / "end.png").convert("RGB")).astype(int)
    assert not np.array_equal(px, np.asarray(
        Image.open(tmp_path / "sparsity.png").convert("RGB")).astype(int))


def test_curves_and_confusion_are_capped(tmp_path):
    with open(tmp_path / "m.jsonl", "w") as f:
        for s in range(1, 100_001):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "train_acc": 0.5}) + "\n")
    plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    w, h = Image.open(tmp_path / "c.png").size
    assert w < 1500 and h < 600
    n = 1000
    plot_confusion(np.eye(n, dtype=int) * 3, [f"class {i}" for i in range(n)],
                   tmp_path / "cm.png")
    w, h = Image.open(tmp_path / "cm.png").size
    assert w <= MAX_INCHES * 110 * 1.3 and h <= MAX_INCHES * 110 * 1.3


@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_histories_unchanged(n):
    assert evenly(n, 300) == list(range(n))
