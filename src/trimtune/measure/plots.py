"""Plots people would rather look at than read: curves, confusion matrices, bar charts.

Every plot stays readable (and small) at any length: long histories are resampled to at most
a few hundred / thousand points (:func:`evenly`), figure sizes are capped, labels thinned.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..checkpoint import atomic_path  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


MAX_POINTS = 2000  # points of a curve
MAX_INCHES = 14.0  # a side of a figure


def evenly(n: int, most: int) -> list[int]:
    """At most ``most`` indices of ``range(n)``, evenly spaced, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, most)})


def read_jsonl(path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: skip it
                continue
    return rows


def plot_curves(metrics_jsonl, path, title: str = "") -> Path | None:
    """Training loss and accuracies against the optimizer step, from metrics.jsonl: the
    logged training accuracy and any validation metric (``val_*``) written at epoch ends."""
    rows = read_jsonl(metrics_jsonl)
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    if not steps:
        return None
    steps = [steps[i] for i in evenly(len(steps), MAX_POINTS)]
    accs: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if "acc" in k and "step" in r and isinstance(v, (int, float)):
                accs.setdefault(k, []).append((r["step"], v))
    accs = {k: [p[i] for i in evenly(len(p), MAX_POINTS)] for k, p in accs.items()}
    fig, axes = plt.subplots(1, 2 if accs else 1, figsize=(10 if accs else 5, 3.5))
    axes = np.atleast_1d(axes)
    axes[0].plot(*zip(*steps), lw=1)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title=title or "loss")
    axes[0].set_yscale("log")
    for k, pts in sorted(accs.items()):
        axes[1].plot(*zip(*pts), marker="o" if k.startswith("val") else None, label=k)
    if accs:
        axes[1].set(xlabel="optimizer step", ylabel="accuracy", title="accuracy")
        axes[1].legend()
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, classes, path, title: str = "") -> Path:
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(cm)
    side = min(MAX_INCHES, 1.0 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(side, side - 0.2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    labels = list(classes) if classes else [str(i) for i in range(n)]
    ticks = evenly(n, 40)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_bars(groups: dict[str, dict[str, float]], path, ylabel: str, title: str = "",
              errors: dict[str, dict[str, float]] | None = None,
              ylim: tuple[float, float] | None = None) -> Path:
    """Grouped bar chart: ``groups[series][category] = value``; ``errors`` (same keys) draws
    error bars (e.g. the standard deviation over seeds)."""
    series = list(groups)
    cats = list(dict.fromkeys(c for s in series for c in groups[s]))
    x = np.arange(len(cats))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(5, 1.2 * len(cats))), 3.8))
    for i, s in enumerate(series):
        vals = [groups[s].get(c, np.nan) for c in cats]
        err = [errors.get(s, {}).get(c, np.nan) for c in cats] if errors else None
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=s, yerr=err, capsize=3)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xticks(x, cats, rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)
