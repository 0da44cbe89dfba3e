"""SNELL's competition by magnitude: which entries of an update survive (the threshold, an
exact k-th value) and how the survivors are kept (the sparsify modes, described in
:mod:`.delta`); the maths every autograd path of :mod:`.autograd` recomputes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.func import functional_call

from ...errors import TrimtuneError
from ...names import SPARSIFY
from .kernels import Kernel


def check_sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise TrimtuneError(f"sparsity {s} is outside [0, 1): give the fraction of update "
                            "entries to zero, e.g. 0.5")
    return s


def num_zeroed(sparsity: float, numel: int) -> int:
    """``k = floor(s * numel)`` (with a 1e-9 guard against 0.29 * 100 = 28.999...)."""
    return min(numel, int(math.floor(sparsity * numel + 1e-9)))


#: below this many entries "auto" uses plain ``kthvalue`` on the CPU (sampling does not pay)
SAMPLE_MIN_NUMEL = 1 << 16
_SAMPLES = 1 << 14


def kth_smallest(v: torch.Tensor, k: int, method: str = "auto") -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of the 1-D tensor ``v``, exactly.

    ``method``:

    - ``"kthvalue"``: a selection over all of ``v`` (a copy of ``v``, ~10 ns per entry on a CPU
      core; its cost also depends on the data);
    - ``"sample"``: the k-th value of a strided sample of ``2^14`` entries brackets the answer
      in ``[lo, hi]`` (a +-4 sigma rank margin); one comparison pass counts the entries below
      ``lo`` and picks the few in ``[lo, hi]`` (~2% of ``v``), and ``kthvalue`` on those gives
      the exact answer, ties included. If the bracket misses (unlikely; or NaNs), it falls back
      to ``"kthvalue"``, so the result is always exact;
    - ``"topk"``: the max of the ``k`` smallest or the min of the ``n - k + 1`` largest,
      whichever side is smaller (a buffer of at most n / 2 values + indices);
    - ``"auto"``: topk on CUDA, where ``kthvalue`` is ~35x slower (11.8 ms vs 0.34 ms for
      2.4M values on an H100); on the CPU "sample" from :data:`SAMPLE_MIN_NUMEL` entries,
      kthvalue below. (``torch.quantile`` refuses inputs above 16M elements.)
    """
    n = v.numel()
    if method == "auto":
        method = "topk" if v.is_cuda else "sample" if n >= SAMPLE_MIN_NUMEL else "kthvalue"
    if method == "sample":
        return _kth_sampled(v, k)
    if method == "kthvalue":
        return v.kthvalue(k).values
    if k <= n - k + 1:
        return v.topk(k, largest=False, sorted=False).values.max()
    return v.topk(n - k + 1, largest=True, sorted=False).values.min()


def _kth_sampled(v: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kth_smallest` by a sampled bracket refined exactly (see its ``"sample"``)."""
    n = v.numel()
    sample = v[::max(1, n // _SAMPLES)].sort().values
    m = sample.numel()
    q = (k - 0.5) / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0
    lo = sample[max(0, int(q * m - margin))]
    hi = sample[min(m - 1, int(math.ceil(q * m + margin)))]
    below = int(torch.count_nonzero(v < lo))
    band = v[(v >= lo) & (v <= hi)]
    j = k - below  # the answer is the j-th smallest of the band iff 1 <= j <= len(band)
    if 1 <= j <= band.numel():
        return band.kthvalue(j).values
    return v.kthvalue(k).values


def magnitude_threshold(dw: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th smallest ``|dW|`` (detached), ``k = floor(s * numel)``; 0 when k = 0
    (:func:`kth_smallest`: no element-count limit, no sort)."""
    k = num_zeroed(sparsity, dw.numel())
    if k == 0:
        return dw.new_zeros(())
    return kth_smallest(dw.detach().abs().flatten(), k)


def sparsify(dw: torch.Tensor, threshold: torch.Tensor | None, mode: str = "code"
             ) -> torch.Tensor:
    """Apply the magnitude competition to ``dW`` given its threshold ``t``.

    Args:
        dw: (d_in, d_out) dense update.
        threshold: scalar t (no gradient flows through it); ``None`` means no competition
            (s = 0): ``"code"`` and ``"soft"`` then give ``dW * |dW|`` without building a mask.
        mode: ``"code"``, ``"squared"``, ``"soft"``, ``"mask"`` or ``"none"`` (see
            :mod:`.delta`).

    Returns:
        (d_in, d_out) with every entry ``|dW| <= t`` exactly zero (``"none"``: ``dW``;
        ``"mask"`` keeps the survivors' values, ``dW 1[|dW| > t]``).
        Under autograd, ``"code"`` has the authors' gradient ``|dW|`` (magnitude detached).
    """
    if mode == "none" or (mode == "mask" and threshold is None):
        return dw
    if mode not in SPARSIFY:
        raise TrimtuneError(f"unknown sparsify mode {mode!r}: use one of {', '.join(SPARSIFY)}")
    a = dw.abs()
    if mode == "mask":  # the survivors as they are: gradient 1 on them, the mask detached
        return torch.where(a > threshold, dw, 0.0)
    mag = a.detach() if mode == "code" else a
    if threshold is None:
        return dw * mag
    if mode == "soft":
        return dw * (a - threshold).clamp(min=0)
    return torch.where(a > threshold, dw * mag, 0.0)


def competition_threshold(dw: torch.Tensor, sparsity: float, mode: str
                          ) -> torch.Tensor | None:
    """:func:`magnitude_threshold`, or ``None`` when nothing competes (k = 0 or mode "none"):
    no k-th value over the m*n entries and no mask then."""
    if mode == "none" or num_zeroed(sparsity, dw.numel()) == 0:
        return None
    return magnitude_threshold(dw, sparsity)


def _sparse_delta(kernel: Kernel, names: Sequence[str], a: torch.Tensor, b: torch.Tensor,
                  kparams: Sequence[torch.Tensor], mode: str, threshold: torch.Tensor | None
                  ) -> torch.Tensor:
    """``dW_s`` (d_in, d_out) of one unit given its threshold, in the factors' dtype with
    autocast off (distances in bf16 are too coarse)."""
    with torch.autocast(a.device.type, enabled=False):
        return sparsify(functional_call(kernel, dict(zip(names, kparams)), (a, b)), threshold,
                        mode)


def _forward_delta(kernel: Kernel, names: Sequence[str], a: torch.Tensor, b: torch.Tensor,
                   kparams: Sequence[torch.Tensor], sparsity: float, mode: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dW_s, t)`` with the threshold computed from ``sparsity`` (saved for backward)."""
    with torch.autocast(a.device.type, enabled=False):
        dw = functional_call(kernel, dict(zip(names, kparams)), (a, b))
        t = competition_threshold(dw, sparsity, mode)
        return sparsify(dw, t, mode), t


__all__ = ["SPARSIFY", "check_sparsity", "competition_threshold", "kth_smallest",
           "magnitude_threshold", "num_zeroed", "sparsify"]
