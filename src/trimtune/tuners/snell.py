"""The kernelised sparse delta layer of SNELL / SNELLA.

A frozen ``nn.Linear`` (weight W, out x in) gains a sparse, high-rank update learned through
two small factors::

    dW   = kernel(A, B)                 (d_in, d_out)  A: (d_in, r), B: (d_out, r)
    dW_s = sparsify(dW, s)              a fraction s of the entries is zero
    y    = base(x) + DropPath(dropout(x) @ dW_s)

Sparsification is a competition by magnitude, recomputed at every forward (nothing stored):
``t = kthvalue(|dW|.flatten(), k)``, ``k = floor(s * d_in * d_out)``, then

- ``"code"`` (default, the authors' code, forward AND backward):
  ``dW_s = dW * sg(|dW|) * 1[|dW| > t]`` with ``sg`` = stop-gradient, as their
  ``weight * F.threshold(weight.detach().abs(), t, 0)``: the gradient w.r.t. ``dW`` is ``|dW|``
  on the survivors;
- ``"squared"``: the same forward, differentiated in full (``2 |dW|`` on the survivors);
- ``"soft"`` (the paper, Eq. 5): ``dW_s = dW * max(|dW| - t, 0)`` (true derivative);
- ``"none"``: ``dW_s = dW`` (plain kernel update; the authors' SNELL at s = 0, class ``KLoRA``).

At ``s = 0`` "code", "squared" and "soft" give the squared form ``dW * |dW|`` (as the authors'
SNELLA class, which squares at every sparsity); the config's ``unit_sparsify`` gives SNELL
at sparsity 0 the plain update ``"none"``, as the authors' SNELL code does.

The dense ``dW`` (the size of the weight) is not kept for backward: :class:`SparseDeltaFunction`
saves only ``x``, ``A``, ``B``, the kernel's parameters and the threshold, and recomputes
``dW`` in the backward pass (as the authors' activation checkpointing, without a second
forward of the rest of the branch).

Fused path (default). Without branch dropout and drop-path (or in eval mode) the branch is
linear in ``x`` and shares it with the base layer, so :class:`FusedSnellFunction` computes
``y = x @ (W + dW_s^T)^T + b`` in ONE matmul with a temporary ``W' = W + dW_s^T``. Backward
recomputes ``dW_s`` (with the threshold saved in forward: one k-th value per unit per step),
then ``grad_x = g @ W'`` and ``grad_dW_s = x^T g``, and autograd through the kernel to ``A``,
``B`` and the kernel scalars: 3 full-size matmuls per layer (LoRA: 2) instead of 5 for the
unfused branch. The unfused path remains for branch dropout / drop-path > 0 (the authors' 0.1).

Compiled path (CPU default for large units). The fused layer's per-unit element-wise work
(distances, kernel, softmax, mask, W', and the closed-form VJP) runs as a few
``torch.compile``-fused loops (:mod:`trimtune.tuners.compiled`; ``TRIMTUNE_COMPILE=0`` turns
it off, ``1`` forces it everywhere) instead of ~20 ATen passes over the (d_in, d_out) update;
the threshold is still an exact k-th value (:func:`kth_smallest`, a sampled bracket refined
exactly on the CPU). Small units (tests, tiny models) stay on the eager closed form.

A :class:`SparseDelta` is one (A, B, kernel, sparsity) unit for one (d_in, d_out) block; the
PEFT layer :class:`~trimtune.tuners.snell_tuner.SnellLinear` wraps the frozen base linear and
concatenates the outputs of its units (one unit, or three for timm's fused ``qkv``: separate
q, k, v updates as the authors).
The SNELLA allocator iterates the ``SparseDelta`` modules of a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import TrimtuneError
from . import compiled
from .kernels import Kernel, MixtureKernel, PiecewiseLinearKernel, merge_segments, split_segments

SPARSIFY = ("code", "squared", "soft", "none")


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
        mode: ``"code"``, ``"squared"``, ``"soft"`` or ``"none"`` (see the module docstring).

    Returns:
        (d_in, d_out) with every entry ``|dW| <= t`` exactly zero (``"none"``: ``dW``).
        Under autograd, ``"code"`` has the authors' gradient ``|dW|`` (magnitude detached).
    """
    if mode == "none":
        return dw
    if mode not in SPARSIFY:
        raise TrimtuneError(f"unknown sparsify mode {mode!r}: use one of {', '.join(SPARSIFY)}")
    a = dw.abs()
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


# ----------------------------------------------------------------------------- closed-form VJP
# The backward of dW_s = sparsify(kernel(A, B)) written out for the piecewise and mixture
# kernels. Autograd through the same expression records ~40 full-size (d_in, d_out) ops and
# keeps about ten full-size tensors alive; the closed form needs ~20 ops and five tensors.
# Values are bit-identical to the forward (same ops in the same order), so the recomputed
# mask matches the threshold found in forward.

_CDIST_EPS = 1e-12  # kernels.safe_cdist's default


def closed_form_supported(kernel: Kernel) -> bool:
    """True for the kernels with a hand-written backward (piecewise, mixture)."""
    return type(kernel) in (PiecewiseLinearKernel, MixtureKernel)


def _kernel_params(kernel: Kernel, names: Sequence[str], kparams: Sequence[torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    tensors = dict(kernel.named_buffers(recurse=False))
    tensors.update(zip(names, kparams))
    return tensors


def recompute_delta(kernel: Kernel, names: Sequence[str], a: torch.Tensor, b: torch.Tensor,
                    kparams: Sequence[torch.Tensor], mode: str, t: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict]:
    """``dW_s`` (as :func:`_sparse_delta`, without a graph) and what :func:`delta_vjp`
    needs: the distances, their clamp mask, ``K``, the softmax and ``dW``."""
    p = _kernel_params(kernel, names, kparams)
    seg = kernel.segments
    with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
        a3, b3 = split_segments(a, seg), split_segments(b, seg)
        yy = (b3 * b3).sum(-1).unsqueeze(-2)
        sq = torch.baddbmm(yy, a3, b3.mT, alpha=-2).add_((a3 * a3).sum(-1, keepdim=True))
        live = sq > _CDIST_EPS  # where the clamp passes gradient
        dist = sq.clamp_(min=_CDIST_EPS).sqrt_()  # (P, d_in, d_out), as safe_cdist
        k = torch.einsum("p,pij->ij", p["coeffs"].to(dist.dtype), dist)
        soft = None
        if isinstance(kernel, MixtureKernel):
            soft = torch.softmax(k / p["gamma"], dim=-1)
            dw = k + p["alpha"] * soft + p["beta"]
        else:
            dw = k
        dws = sparsify(dw, t, mode)
    return dws, {"a3": a3, "b3": b3, "dist": dist, "live": live, "k": k, "soft": soft,
                 "dw": dw, "p": p, "factor_dim": a.dim()}


def delta_vjp(kernel: Kernel, names: Sequence[str], cache: dict, mode: str,
              t: torch.Tensor | None, g: torch.Tensor, need_a: bool, need_b: bool
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of ``<g, dW_s>`` w.r.t. ``A``, ``B`` and the kernel parameters ``names``.

    Args:
        cache: from :func:`recompute_delta` (consumed: its tensors are freed as used).
        g: (d_in, d_out), the gradient of the loss w.r.t. ``dW_s``.
    """
    with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
        dw, p = cache.pop("dw"), cache["p"]
        g = g.to(dw.dtype)
        if mode == "none":
            gd = g
        else:  # in place on one new buffer (g itself may alias the weight gradient)
            gd = dw.abs()
            keep = None if t is None else gd > t
            if mode != "code":  # d(dw |dw|) = 2 |dw|; "code" detaches |dw| (the authors): |dw|
                gd.mul_(2)
            if keep is not None:
                if mode == "soft":  # dw * relu(|dw| - t) -> 2 |dw| - t (clamp: strict >)
                    gd.sub_(t)
                gd.mul_(keep)
            gd.mul_(g)
            del keep
        del dw
        grads: dict[str, torch.Tensor] = {}
        k, soft = cache.pop("k"), cache.pop("soft")
        if soft is not None:
            grads["alpha"] = (gd * soft).sum()
            grads["beta"] = gd.sum()
            gs = gd * p["alpha"]
            gz = soft.mul_(gs - (gs * soft).sum(-1, keepdim=True))  # softmax backward
            del gs
            grads["gamma"] = -(gz * k).sum() / p["gamma"] ** 2
            gk = gz.div_(p["gamma"]).add_(gd)
        else:
            gk = gd
        del k, gd
        dist, live = cache.pop("dist"), cache.pop("live")
        coeffs = p["coeffs"]
        if "coeffs" in names:
            grads["coeffs"] = torch.einsum("ij,pij->p", gk, dist).to(coeffs.dtype)
        # dL/dsq_p = c_p gK / (2 D_p) where the clamp passed; D = sqrt(sq)
        h = dist.reciprocal_().mul_(gk.unsqueeze(0)).mul_(
            (0.5 * coeffs.to(gk.dtype)).view(-1, 1, 1)).mul_(live)
        del dist, live, gk
        a3, b3 = cache["a3"], cache["b3"]
        ga = gb = None
        flat = merge_segments if cache["factor_dim"] == 2 else (lambda f: f)
        if need_a:  # d sq_ij / d a_i = 2 (a_i - b_j)
            ga = flat(2 * (h.sum(-1, keepdim=True) * a3 - h @ b3))
        if need_b:
            gb = flat(2 * (h.sum(-2).unsqueeze(-1) * b3 - h.mT @ a3))
    return ga, gb, [grads.get(n) for n in names]


# ----------------------------------------------------------------------------- compiled path
# The same maths fused by torch.compile (trimtune.tuners.compiled): a unit takes it when
# compiled.use_compiled(...) says so, in forward and backward alike (both recompute dW with the
# same code, so the mask recomputed in backward matches the forward's threshold).


def _compiled_unit(kernel: Kernel, a: torch.Tensor, b: torch.Tensor) -> bool:
    return (closed_form_supported(kernel) and a.dim() == 2
            and compiled.use_compiled(a.device, a.shape[0] * b.shape[0]))


def _compiled_args(kernel: Kernel, names: Sequence[str], a: torch.Tensor, b: torch.Tensor,
                   kparams: Sequence[torch.Tensor]) -> tuple:
    """``(a3, bt, coeffs, alpha, gamma, beta)`` for :mod:`.compiled`: contiguous
    (P, d_in, r/P) and (P, r/P, d_out) factors and the kernel scalars in the factors' dtype."""
    p = _kernel_params(kernel, names, kparams)
    seg, dt = kernel.segments, a.dtype
    a3 = split_segments(a, seg).contiguous()
    bt = split_segments(b, seg).transpose(1, 2).contiguous()
    zero = a.new_zeros(())
    scal = [p[n].to(dt) if n in p else zero for n in ("alpha", "gamma", "beta")]
    return (a3, bt, p["coeffs"].to(dt), *scal)


def _mode_tensors(mode: str, t: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """``(t, sub, two, plain)`` of :mod:`.compiled` for a sparsify mode (tensors: no recompile
    when the threshold or the sparsity changes); t = 0 when nothing competes."""
    tt = like.new_zeros(()) if t is None else t.to(like.dtype)
    sub = tt if mode == "soft" else like.new_zeros(())
    two = like.new_tensor(1.0 if mode == "code" else 2.0)
    return tt, sub, two, like.new_tensor(1.0 if mode == "none" else 0.0)


def _compiled_forward_delta(kernel: Kernel, names: Sequence[str], a: torch.Tensor,
                            b: torch.Tensor, kparams: Sequence[torch.Tensor], sparsity: float,
                            mode: str) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """``(dW, t, (t, sub, plain))``: the dense update (not sparsified) and its threshold."""
    with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
        args = _compiled_args(kernel, names, a, b, kparams)
        dw = compiled.call("dense", *args, isinstance(kernel, MixtureKernel))
        t = competition_threshold(dw, sparsity, mode)
        tt, sub, _, plain = _mode_tensors(mode, t, dw)
    return dw, t, (tt, sub, plain)


class SparseDeltaFunction(torch.autograd.Function):
    """``y = x @ sparsify(kernel(A, B))`` that recomputes ``dW`` in backward.

    Saved for backward: ``x``, ``A``, ``B``, the kernel's parameters and the scalar threshold;
    memory ``O(batch activations + r (d_in + d_out))``, never ``O(d_in * d_out)``.
    """

    @staticmethod
    def forward(ctx, x, a, b, kernel: Kernel, sparsity: float, mode: str, names, *kparams):
        with torch.no_grad():
            dws, t = _forward_delta(kernel, names, a, b, kparams, sparsity, mode)
            with torch.autocast(x.device.type, enabled=False):
                y = x @ dws.to(x.dtype)
        ctx.kernel, ctx.mode, ctx.names = kernel, mode, names
        ctx.save_for_backward(x, a, b, t, *kparams)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a, b, t, *kparams = ctx.saved_tensors
        need = ctx.needs_input_grad
        leaves = [a, b, *kparams]
        flags = [need[1], need[2], *need[7:]]
        if closed_form_supported(ctx.kernel):
            dws, cache = recompute_delta(ctx.kernel, ctx.names, a, b, kparams, ctx.mode, t)
            gx = gy @ dws.to(gy.dtype).T if need[0] else None
            grads = [None] * len(leaves)
            if any(flags):
                g_dws = x.reshape(-1, x.shape[-1]).T.to(dws.dtype) @ gy.reshape(
                    -1, gy.shape[-1]).to(dws.dtype)
                del dws
                ga, gb, gk = delta_vjp(ctx.kernel, ctx.names, cache, ctx.mode, t, g_dws,
                                       flags[0], flags[1])
                grads = [ga, gb, *(g if f else None for g, f in zip(gk, flags[2:]))]
                grads = [g if g is not None or not f else torch.zeros_like(v)
                         for g, f, v in zip(grads, flags, leaves)]
            return (gx, grads[0], grads[1], None, None, None, None, *grads[2:])
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(f) for v, f in zip(leaves, flags)]
            dws = _sparse_delta(ctx.kernel, ctx.names, leaves[0], leaves[1], leaves[2:],
                                ctx.mode, t)
        gx = gy @ dws.detach().to(gy.dtype).T if need[0] else None
        grads = [None] * len(leaves)
        wanted = [i for i, f in enumerate(flags) if f]
        if wanted:
            g_dws = x.reshape(-1, x.shape[-1]).T.to(dws.dtype) @ gy.reshape(-1, gy.shape[-1]).to(
                dws.dtype)  # (d_in, d_out)
            out = torch.autograd.grad(dws, [leaves[i] for i in wanted], g_dws, allow_unused=True)
            for i, g in zip(wanted, out):
                grads[i] = g if g is not None else torch.zeros_like(leaves[i])
        return (gx, grads[0], grads[1], None, None, None, None, *grads[2:])


class FusedSnellFunction(torch.autograd.Function):
    """``y = F.linear(x, W + cat_u(dW_s,u)^T, b)``: base layer and branch in one matmul.

    ``units`` is a tuple of ``(kernel, sparsity, mode, param_names)``, one per
    :class:`SparseDelta` (three for a split qkv; their updates are concatenated along the
    output dim); ``params`` holds, per unit, ``A, B, *kernel_params`` in that order.

    Forward builds the temporary ``W'`` (out, in) and keeps neither it nor ``dW``. Saved for
    backward: ``x``, the factors, kernel parameters and one threshold per unit (the frozen
    ``W`` is a parameter, referenced, not copied). Backward recomputes ``dW_s`` with the saved
    thresholds and does two full-size matmuls: ``grad_x = g @ W'``, ``grad_dW_s = x^T g``.

    Shape:
        - x: (*, in), W: (out, in), b: (out,) or None
        - Output: (*, out)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, units, *params):
        with torch.no_grad():
            parts, ts, fast, i, o0 = [], [], [], 0, 0
            for kernel, sparsity, mode, names in units:
                n = 2 + len(names)
                a, b, *kp = params[i:i + n]
                fast.append(_compiled_unit(kernel, a, b))
                if fast[-1]:  # the unit's rows of W' = W + dW_s^T in one fused pass
                    dw, t, mt = _compiled_forward_delta(kernel, names, a, b, kp, sparsity, mode)
                    parts.append(compiled.call("merge", weight[o0:o0 + b.shape[0]], dw, *mt))
                    del dw
                else:
                    dws, t = _forward_delta(kernel, names, a, b, kp, sparsity, mode)
                    parts.append(weight[o0:o0 + b.shape[0]] + dws.T.to(weight.dtype))
                    del dws
                ts.append(t)
                i, o0 = i + n, o0 + b.shape[0]
            w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (out, in) temporary
            del parts
            y = F.linear(x, w, bias)  # ambient autocast applies, as for the base layer
        ctx.units, ctx.n_ts, ctx.fast = units, len(ts), tuple(fast)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *ts, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, *rest = ctx.saved_tensors
        ts, params = rest[:ctx.n_ts], rest[ctx.n_ts:]
        need = ctx.needs_input_grad
        if all(closed_form_supported(u[0]) for u in ctx.units):  # factors: 2-D (SparseDelta)
            gx, g_w, g_b, grads = _fused_closed_backward(ctx.units, ctx.has_bias, x, weight, ts,
                                                         params, gy, need, ctx.fast)
            return (gx, g_w, g_b, None, *grads)
        flags = need[4:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(f) for p, f in zip(params, flags)]
            parts, i = [], 0
            for (kernel, _, mode, names), t in zip(ctx.units, ts):
                n = 2 + len(names)
                a, b, *kp = leaves[i:i + n]
                parts.append(_sparse_delta(kernel, names, a, b, kp, mode, t))
                i += n
        dws = parts[0] if len(parts) == 1 else torch.cat([p.detach() for p in parts], dim=1)
        gx = g_w = g_b = None
        g2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
        if need[0]:
            w = (weight + dws.detach().T.to(weight.dtype)).to(gy.dtype)  # (out, in)
            gx = (gy @ w).to(x.dtype)
        wanted = [j for j, f in enumerate(flags) if f]
        if wanted or need[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(gy.dtype)  # (N, in)
            g_dws = x2.T @ g2  # (in, out): the weight gradient, in dW's layout
            if need[1]:
                g_w = g_dws.T.to(weight.dtype)
        if need[2] and ctx.has_bias:
            g_b = g2.sum(0)
        grads = [None] * len(leaves)
        if wanted:
            g_dws = g_dws.to(parts[0].dtype)
            g_parts = (g_dws,) if len(parts) == 1 else g_dws.split(
                [p.shape[1] for p in parts], dim=1)
            out = torch.autograd.grad(parts, [leaves[j] for j in wanted], g_parts,
                                      allow_unused=True)
            for j, g in zip(wanted, out):
                grads[j] = g if g is not None else torch.zeros_like(leaves[j])
        return (gx, g_w, g_b, None, *grads)


# elements of one unit's (d_in, d_out) update rebuilt at a time in the fused backward: the
# recompute and its VJP hold ~9 tensors of this size, so row blocks bound the transient
# (a 768 x 3072 ViT-B MLP update is 2.4M entries). On CUDA blocks cost kernel launches, so
# only very large layers are split there.
BACKWARD_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 23}


def _row_blocks(d_in: int, d_out: int, device: torch.device) -> list[tuple[int, int]]:
    rows = max(1, BACKWARD_BLOCK_ELEMENTS.get(device.type, 1 << 23) // max(1, d_out))
    return [(i, min(i + rows, d_in)) for i in range(0, d_in, rows)]


def _fused_closed_backward(units, has_bias: bool, x, weight, ts, params, gy, need,
                           fast: Sequence[bool] | None = None):
    """Backward of :class:`FusedSnellFunction` with the closed-form kernel VJP, one row block
    of each unit's update at a time: ``grad_x = g W'`` built from the matching blocks of
    ``W' = W + dW_s^T`` (never whole; the same matmul work as one full product), and the
    factor / kernel gradients accumulated over the blocks.

    Returns ``(grad_x, grad_W, grad_b, grads)``, ``grads`` in ``params`` order."""
    flags = need[4:]
    g2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    gx = g2.new_zeros(x2.shape) if need[0] else None  # (N, in), filled block by block
    g_w = (x2.to(gy.dtype).T @ g2).T.to(weight.dtype) if need[1] else None
    g_b = g2.sum(0) if need[2] and has_bias else None
    grads: list[torch.Tensor | None] = [None] * len(params)
    i, o0 = 0, 0
    for u, ((kernel, _, mode, names), t) in enumerate(zip(units, ts)):
        n = 2 + len(names)
        a, b, *kp = params[i:i + n]
        fa, fb, fk = flags[i], flags[i + 1], flags[i + 2:i + n]
        o1 = o0 + b.shape[0]
        gu = g2[:, o0:o1]
        if fast is not None and fast[u]:
            grads[i:i + n] = _compiled_unit_backward(kernel, names, mode, t, a, b, kp, x2, gu,
                                                     weight[o0:o1], gx, flags[i:i + n])
            i, o0 = i + n, o1
            continue
        ga = torch.zeros_like(a) if fa else None
        gb = torch.zeros_like(b) if fb else None
        gk: list[torch.Tensor | None] = [None] * len(names)
        for r0, r1 in _row_blocks(a.shape[0], b.shape[0], a.device):
            dws, cache = recompute_delta(kernel, names, a[r0:r1], b, kp, mode, t)
            if gx is not None:  # the (out_u, rows) block of W' = W + dW_s^T, then one matmul
                w_blk = (weight[o0:o1, r0:r1] + dws.T.to(weight.dtype)).to(gy.dtype)
                gx[:, r0:r1] += gu @ w_blk
                del w_blk
            if fa or fb or any(fk):
                g_blk = x2[:, r0:r1].T.to(dws.dtype) @ gu.to(dws.dtype)  # (rows, out_u)
                del dws
                ga_b, gb_b, gk_b = delta_vjp(kernel, names, cache, mode, t, g_blk, fa, fb)
                if fa:
                    ga[r0:r1] = ga_b
                if fb:
                    gb += gb_b
                for j, (g, f) in enumerate(zip(gk_b, fk)):
                    if f and g is not None:
                        gk[j] = g if gk[j] is None else gk[j] + g
        for j, g in enumerate([ga, gb, *gk]):
            if flags[i + j]:
                grads[i + j] = g if g is not None else torch.zeros_like(params[i + j])
        i, o0 = i + n, o1
    return (gx.reshape(x.shape).to(x.dtype) if gx is not None else None), g_w, g_b, grads


def _compiled_unit_backward(kernel: Kernel, names: Sequence[str], mode: str,
                            t: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                            kp: Sequence[torch.Tensor], x2: torch.Tensor, gu: torch.Tensor,
                            w: torch.Tensor, gx: torch.Tensor | None, flags: Sequence[bool]
                            ) -> list[torch.Tensor | None]:
    """One unit of :func:`_fused_closed_backward` on the compiled path, in row blocks: adds
    the unit's ``gu @ W'_u`` to ``gx`` (N, in) when given and returns ``[gA, gB, *g_kernel]``
    (None where not flagged). ``w``: the unit's (out_u, in) rows of the frozen weight."""
    with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
        a3, bt, *scal = _compiled_args(kernel, names, a, b, kp)
        mt = _mode_tensors(mode, t, a3)
        mixture = isinstance(kernel, MixtureKernel)
        want = any(flags)
        ga3, gb3, gsc = torch.zeros_like(a3), torch.zeros_like(bt), None
        for r0, r1 in _row_blocks(a.shape[0], b.shape[0], a.device):
            w_blk = None if gx is None else w[:, r0:r1]
            if want:
                g_blk = x2[:, r0:r1].T.to(a.dtype) @ gu.to(a.dtype)  # (rows, out_u)
                w_out, ga_b, gb_b, *gs = compiled.call("vjp", a3[:, r0:r1], bt, *scal, *mt,
                                                       g_blk, w_blk, mixture)
                del g_blk
                ga3[:, r0:r1] = ga_b
                gb3 += gb_b
                gsc = gs if gsc is None else [s0 + s1 for s0, s1 in zip(gsc, gs)]
            elif w_blk is not None:  # frozen factors: only grad_x
                dw = compiled.call("dense", a3[:, r0:r1], bt, *scal, mixture)
                w_out = compiled.call("merge", w_blk, dw, mt[0], mt[1], mt[3])
                del dw
            if gx is not None:
                gx[:, r0:r1] += gu @ w_out.to(gu.dtype)
                del w_out
        if not want:
            return [None] * len(flags)
        by_name = dict(zip(("coeffs", "alpha", "gamma", "beta"), gsc))
        grads = [merge_segments(ga3), merge_segments(gb3.transpose(1, 2)),
                 *(by_name[nm].to(p.dtype) for nm, p in zip(names, kp))]
    return [g if f else None for g, f in zip(grads, flags)]


class SparseDelta(nn.Module):
    """One sparse kernelised update for a (d_in, d_out) weight block.

    Args:
        in_features: d_in.
        out_features: d_out.
        rank: r, columns of ``snell_A`` / ``snell_B``.
        kernel: a :class:`~trimtune.tuners.kernels.Kernel` (its parameters live under
            ``kernel.*``, e.g. ``kernel.alpha``).
        sparsity: s in [0, 1), fraction of entries zeroed; settable at any time.
        sparsify: ``"code"``, ``"squared"``, ``"soft"`` or ``"none"``.
        recompute: recompute dW in backward (default); ``False`` uses plain autograd, which
            keeps the (d_in, d_out) dense update for backward (faster, more memory).

    Attributes:
        snell_A: (d_in, r) parameter.  snell_B: (d_out, r) parameter.
        numel_update: d_in * d_out, the entries that compete.

    Shape:
        - Input: (*, d_in)
        - Output: (*, d_out), i.e. ``x @ dW_s``
    """

    def __init__(self, in_features: int, out_features: int, rank: int, kernel: Kernel,
                 sparsity: float = 0.0, sparsify: str = "code", recompute: bool = True,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        if sparsify not in SPARSIFY:
            raise TrimtuneError(f"unknown sparsify mode {sparsify!r}: use one of "
                                f"{', '.join(SPARSIFY)}")
        if rank < 1 or rank % max(1, kernel.segments):
            raise TrimtuneError(f"rank {rank} is not divisible by segments={kernel.segments}: "
                                "choose a rank that is a positive multiple of segments")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.kernel = kernel
        self.sparsify_mode = sparsify
        self.recompute = recompute
        self.init_scale = float(init_scale)
        # k = entries zeroed, a buffer: saved with the adapter (state dict, PEFT), never cast to
        # a float dtype; `sparsity` is its float view k / (d_in d_out) (the allocator sets it)
        self.register_buffer("zeroed", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(SparseDelta._sync_sparsity)
        self.sparsity = sparsity
        self.snell_A = nn.Parameter(torch.empty(in_features, rank))
        self.snell_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @property
    def sparsity(self) -> float:
        """The fraction of update entries zeroed, ``k / (d_in d_out)``; setting ``s`` zeroes
        ``k = floor(s d_in d_out)`` entries (reading back gives that exact fraction)."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, s: float) -> None:
        k = num_zeroed(check_sparsity(s), self.numel_update)
        self.zeroed.fill_(k)
        self._sparsity = k / self.numel_update

    @staticmethod
    def _sync_sparsity(module: SparseDelta, _incompatible) -> None:
        """After ``load_state_dict``: the float view follows the loaded ``zeroed`` count."""
        module._sparsity = int(module.zeroed) / module.numel_update

    @property
    def numel_update(self) -> int:
        return self.in_features * self.out_features

    def reset_parameters(self) -> None:
        """``kaiming_uniform_(a=sqrt(5))`` on the 3-D (P, d, r/P) view, as the authors (times
        ``init_scale``, 1 by default)."""
        p = max(1, self.kernel.segments)
        for f in (self.snell_A, self.snell_B):
            f3 = torch.empty(p, f.shape[0], self.rank // p)
            nn.init.kaiming_uniform_(f3, a=math.sqrt(5))
            with torch.no_grad():
                f.copy_(f3.transpose(0, 1).reshape(f.shape))
                if self.init_scale != 1.0:
                    f.mul_(self.init_scale)

    def set_lr_scales(self, b: float = 1.0, kernel: float = 1.0) -> None:
        """Learning-rate multipliers of ``snell_B`` and of the kernel's parameters, as
        ``lr_scales`` dicts on the owning modules (the loop's protocol: a module's
        ``lr_scales`` maps its own parameter names to multipliers; 1 = the run's lr)."""
        self.lr_scales = {"snell_B": float(b)} if b != 1.0 else {}
        ks = {n: float(kernel) for n, _ in self.kernel.named_parameters(recurse=False)}
        self.kernel.lr_scales = ks if kernel != 1.0 else {}

    def factor_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(snell_A, snell_B)``: the parameters the SNELLA importance scores use."""
        return self.snell_A, self.snell_B

    def dense_delta(self) -> torch.Tensor:
        """The un-sparsified kernel update ``dW``, (d_in, d_out), differentiable.

        Computed in the factors' dtype with autocast off (distances in bf16 are too coarse).
        """
        with torch.autocast(self.snell_A.device.type, enabled=False):
            return self.kernel(self.snell_A, self.snell_B)

    def delta(self) -> torch.Tensor:
        """``dW_s``, (d_in, d_out), differentiable through plain autograd."""
        dw = self.dense_delta()
        return sparsify(dw, competition_threshold(dw, self.sparsity, self.sparsify_mode),
                        self.sparsify_mode)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``dW_s^T``, (d_out, d_in): the ``nn.Linear.weight`` layout, no gradient."""
        return self.delta().T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recompute or not torch.is_grad_enabled():
            return x @ self.delta().to(x.dtype)
        named = list(self.kernel.named_parameters())
        return SparseDeltaFunction.apply(x, self.snell_A, self.snell_B, self.kernel,
                                         self.sparsity, self.sparsify_mode,
                                         tuple(n for n, _ in named), *(p for _, p in named))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, sparsity={self.sparsity:g}, sparsify={self.sparsify_mode}")


__all__ = ["SparseDelta", "SparseDeltaFunction", "FusedSnellFunction",
           "magnitude_threshold", "kth_smallest", "sparsify", "num_zeroed", "split_segments"]
