"""Fused, compiled kernels of the SNELL / SNELLA update (``torch.compile`` / Inductor).

The eager closed form (:func:`trimtune.tuners.snell.autograd.recompute_delta` /
:func:`~.autograd.delta_vjp`) runs one ATen op per element-wise step: distances,
kernel, softmax, mask and their backward are ~20 passes over the (d_in, d_out) update per layer
per step. Written here as point-wise expressions over the factors (the distance of segment
``p`` is a sum over its ``r / P`` columns, unrolled), Inductor fuses them into a few C++ loops
(CPU) or Triton kernels (CUDA) that read the factors and write only what is asked for:

- :func:`dense` -> ``dW`` (one write), from which the threshold is found;
- :func:`merge` -> ``W + sparsify(dW, t)^T`` (the fused layer's temporary weight, or a row
  block of it);
- :func:`vjp` -> the same block of ``W'`` for ``grad_x`` plus the gradients of the factors
  and the kernel scalars, recomputing ``dW`` inside (nothing full-size is saved in forward).

The sparsify mode enters as tensors (``t``: threshold, 0 when nothing competes;
``sub``: ``t`` for "soft", else 0; ``two``: 2 for "squared" / "soft", 1 for "code";
``plain``: 1 for "none", 2 for "mask": the survivors kept as they are), and so does the
threshold: a change of sparsity by the allocator
never recompiles, one graph per (kernel kind, dtype, segments, rank) serves every unit
(shapes are dynamic).

Policy (:func:`use_compiled`): environment ``TRIMTUNE_COMPILE`` = ``auto`` (the default: on
for CPU units of at least :data:`MIN_NUMEL` entries, off on CUDA and for small units), ``0``
(never) or ``1`` (every closed-form unit, any device). ``auto`` is the default because a whole
training step measured faster with it, first-step compile excluded (2 CPU cores, interleaved,
``benchmarks/profile_snell_step.py``; figures in ``benchmarks/results/speed_snella_cpu.md``):
SNELLA / LoRA 1.44x -> 1.25x on DINOv2-S (112 px, batch 32) and 1.76x -> 1.48x on ViT-B/16
(224 px, batch 8); the first step compiles for 10-30 s, so it pays after a few dozen steps.
The first call of a graph compiles (tens of seconds on 2 CPU cores; Inductor caches the code
on disk for later processes); a failure to compile (no C++ compiler, ...) is reported once and
the eager path is used from then on. Distances here are ``sqrt(sum_c (a_c - b_c)^2)`` (exact
differences, not the expanded form of :func:`~.kernels.safe_cdist`): forward
and backward of a unit always take the same path, so the recomputed mask matches the threshold.
"""

from __future__ import annotations

import os
import warnings

import torch

#: units smaller than this stay eager under ``auto`` (compiling them does not pay)
MIN_NUMEL = 1 << 16
EPS = 1e-12  # kernels.safe_cdist's clamp of the squared distance

_state = {"failed": False, "backend": "inductor", "fns": {}, "warned": set()}
_SETTINGS = {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off",
             "auto": "auto", "": "auto"}


def setting() -> str:
    """``on`` / ``off`` / ``auto`` from ``TRIMTUNE_COMPILE``; an unknown value warns once and
    means ``auto``."""
    raw = os.environ.get("TRIMTUNE_COMPILE", "auto")
    v = raw.strip().lower()
    if v not in _SETTINGS and raw not in _state["warned"]:
        _state["warned"].add(raw)
        warnings.warn(f"trimtune: TRIMTUNE_COMPILE={raw!r} is not one of 0, 1 or auto "
                      "(also off / on / false / true); using auto", stacklevel=2)
    return _SETTINGS.get(v, "auto")


def use_compiled(device: torch.device, numel: int) -> bool:
    """Whether a unit of ``numel`` update entries on ``device`` takes the compiled path."""
    if _state["failed"]:
        return False
    s = setting()
    if s == "off":
        return False
    if s == "on":
        return True
    return device.type == "cpu" and numel >= MIN_NUMEL


def set_backend(backend: str) -> None:
    """``torch.compile`` backend (``"inductor"``; tests use ``"eager"`` to trace fast)."""
    _state["backend"] = backend
    _state["fns"].clear()
    _state["failed"] = False


def _compiled(name: str):
    fns = _state["fns"]
    if name not in fns:
        fns[name] = torch.compile(_RAW[name], dynamic=True, backend=_state["backend"])
    return fns[name]


def call(name: str, *args):
    """Run compiled ``name``; on a compile failure warn once and run it eagerly."""
    if not _state["failed"]:
        try:
            return _compiled(name)(*args)
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            _state["failed"] = True
            warnings.warn(f"trimtune: torch.compile of the SNELL kernels failed ({type(e).__name__}"
                          f": {str(e).splitlines()[0] if str(e) else ''}); using the eager "
                          "path. Set TRIMTUNE_COMPILE=0 to skip compiling.", stacklevel=2)
    return _RAW[name](*args)


# ----------------------------------------------------------------------------- the maths


def _sq(a3: torch.Tensor, bt: torch.Tensor, p: int) -> torch.Tensor:
    """Squared distances of segment ``p``: (rows, n), a sum over its r / P columns."""
    sq = None
    for c in range(a3.shape[2]):
        d = (a3[p, :, c:c + 1] - bt[p, c:c + 1, :]).square()
        sq = d if sq is None else sq + d
    return sq


def _kernel(a3, bt, coeffs, alpha, gamma, beta, mixture: bool):
    """``(dW, K, softmax or None)`` of the piecewise (``mixture=False``) / mixture kernel."""
    k = None
    for p in range(a3.shape[0]):
        term = coeffs[p] * _sq(a3, bt, p).clamp(min=EPS).sqrt()
        k = term if k is None else k + term
    if not mixture:
        return k, k, None
    soft = torch.softmax(k / gamma, dim=-1)
    return k + alpha * soft + beta, k, soft


def _factor(dw, t, sub, plain):
    """``dW_s = dW * factor``: ``where(|dW| > t, |dW| - sub, 0)``; 1 for mode "none"
    (``plain`` 1); ``where(|dW| > t, 1, 0)`` for "mask" (``plain`` 2)."""
    a = dw.abs()
    keep = a > t
    return torch.where(plain > 1.5, torch.where(keep, 1.0, 0.0),
                       torch.where(plain > 0.5, 1.0, torch.where(keep, a - sub, 0.0)))


def dense(a3, bt, coeffs, alpha, gamma, beta, mixture: bool):
    """``dW`` (rows, n) from ``a3`` (P, rows, r/P) and ``bt`` (P, r/P, n)."""
    return _kernel(a3, bt, coeffs, alpha, gamma, beta, mixture)[0]


def merge(w, dw, t, sub, plain):
    """``W + sparsify(dW)^T``: ``w`` (n, rows) in weight layout, ``dw`` (rows, n)."""
    return w + (dw * _factor(dw, t, sub, plain)).T.to(w.dtype)


def sparsified(dw, t, sub, plain):
    """``sparsify(dW)`` (rows, n)."""
    return dw * _factor(dw, t, sub, plain)


def vjp(a3, bt, coeffs, alpha, gamma, beta, t, sub, two, plain, g, w, mixture: bool):
    """Recompute ``dW`` of a row block and return ``(W'_blk or None, gA3, gB3, g_coeffs,
    g_alpha, g_gamma, g_beta)`` for the upstream gradient ``g`` (rows, n) of ``dW_s``.

    ``w``: the (n, rows) block of the frozen weight, or None when ``grad_x`` is not needed;
    gA3 is (P, rows, r/P), gB3 (P, r/P, n) (partial: sum over row blocks), kernel-scalar
    gradients are partial sums too (zeros for the piecewise kernel's absent scalars).
    """
    dw, k, soft = _kernel(a3, bt, coeffs, alpha, gamma, beta, mixture)
    a = dw.abs()
    g = g.to(dw.dtype)
    keep = a > t
    gd = torch.where(plain > 1.5, torch.where(keep, g, 0.0),
                     torch.where(plain > 0.5, g, g * torch.where(keep, two * a - sub, 0.0)))
    w_out = None if w is None else w + (dw * _factor(dw, t, sub, plain)).T.to(w.dtype)
    zero = gd.new_zeros(())
    if mixture:
        g_alpha, g_beta = (gd * soft).sum(), gd.sum()
        gs = gd * alpha
        gz = soft * (gs - (gs * soft).sum(-1, keepdim=True))
        g_gamma = -(gz * k).sum() / gamma ** 2
        gk = gz / gamma + gd
    else:
        g_alpha = g_beta = g_gamma = zero
        gk = gd
    gc, ga, gb = [], [], []
    for p in range(a3.shape[0]):
        sq = _sq(a3, bt, p)
        dist = sq.clamp(min=EPS).sqrt()
        gc.append((gk * dist).sum())
        h = torch.where(sq > EPS, gk * (0.5 * coeffs[p]) / dist, 0.0)
        gar, gbr = [], []
        for c in range(a3.shape[2]):
            hd = h * (a3[p, :, c:c + 1] - bt[p, c:c + 1, :])  # d sq / d a = 2 (a - b)
            gar.append(2 * hd.sum(1))
            gbr.append(-2 * hd.sum(0))
        ga.append(torch.stack(gar, -1))
        gb.append(torch.stack(gbr, 0))
    return (w_out, torch.stack(ga), torch.stack(gb), torch.stack(gc), g_alpha, g_gamma, g_beta)


_RAW = {"dense": dense, "merge": merge, "sparsified": sparsified, "vjp": vjp}
