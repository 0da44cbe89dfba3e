"""Singular-value spectra of the factorised layers, with the chosen rank marked."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_path
from ..errors import TrimtuneError

__all__ = ["plot_spectra"]


def _spectra_and_ranks(source, ranks) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    if ranks is None:
        record = getattr(source, "trimtune_lowrank", None)
        if not record:
            raise TrimtuneError("plot_spectra needs the ranks: pass a compressed model or "
                                "ranks={layer: rank}")
        ranks = record["ranks"]
    elif isinstance(ranks, nn.Module):
        ranks = (getattr(ranks, "trimtune_lowrank", None) or {}).get("ranks")
        if not ranks:
            raise TrimtuneError("the model passed as ranks is not compressed: pass the result "
                                "of compress() or a {layer: rank} dict")
    ranks = dict(ranks)
    if isinstance(source, Mapping):
        spectra = dict(source)
    elif hasattr(source, "trimtune_spectra") and all(
            n in source.trimtune_spectra for n in ranks):
        spectra = source.trimtune_spectra  # kept by compress(): no second SVD
    elif isinstance(source, nn.Module):
        modules = dict(source.named_modules())
        spectra = {}
        for n in ranks:
            m = modules.get(n)
            if not isinstance(m, nn.Linear):
                raise TrimtuneError(f"layer {n!r} is not a dense nn.Linear of this model: pass "
                                    "the original model, or the compressed model compress() "
                                    "returned (it keeps the spectra)")
            spectra[n] = torch.linalg.svdvals(m.weight.detach().float()).cpu()
    else:
        raise TrimtuneError("plot_spectra: pass a model or a {layer: singular values} dict")
    missing = [n for n in ranks if n not in spectra]
    if missing:
        raise TrimtuneError(f"no spectrum for layer(s) {missing[:3]}: pass the original model")
    return {n: spectra[n] for n in ranks}, ranks


def plot_spectra(model_or_original, ranks=None, path: str | os.PathLike | None = None,
                 max_panels: int = 48, dpi: int = 100) -> Path:
    """One small log-y panel per factorised layer: singular values, chosen rank marked.

    Args:
        model_or_original: the compressed model (uses the spectra ``compress`` kept), the
            original dense model (computes ``svdvals``), or ``{layer: singular values}``.
        ranks: ``{layer: rank}``, a compressed model, or None (read from the first argument).
            ``plot_spectra(compressed, "spectra.png")`` (a path in second place) also works.
        path: PNG file to write (atomically).
        max_panels: plot at most this many layers (evenly spaced through the model).

    Returns:
        the written path.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    if isinstance(ranks, (str, os.PathLike)) and path is None:
        ranks, path = None, ranks
    if path is None:
        raise TrimtuneError("plot_spectra needs a path: plot_spectra(model, path='spectra.png')")
    spectra, ranks = _spectra_and_ranks(model_or_original, ranks)
    names = list(ranks)
    if len(names) > max_panels:
        step = len(names) / max_panels
        names = [names[int(i * step)] for i in range(max_panels)]
    cols = min(6, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(2.4 * cols, 1.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.flat, names):
        s = spectra[n].float().clamp_min(1e-12).numpy()
        r = ranks[n]
        ax.semilogy(range(1, len(s) + 1), s, lw=1)
        ax.axvline(r, color="tab:red", lw=1, ls="--")
        ax.fill_between(range(1, min(r, len(s)) + 1), s[:r], alpha=0.2, color="tab:blue")
        ax.set_title(f"{n}\nr={r}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("singular values (log) and kept rank", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
