"""The autograd paths of a SNELL unit (the maths of :mod:`.sparsifier`, written three ways):

- the closed-form VJP of ``dW_s = sparsify(kernel(A, B))`` for the piecewise and mixture
  kernels (autograd through the recomputed update for the others);
- the same maths fused by ``torch.compile`` (:mod:`.compiled`) for large units;
- :class:`SparseDeltaFunction` (the unfused branch ``x @ dW_s``) and :class:`FusedSnellFunction`
  (base layer and update in one matmul), both recomputing ``dW`` in backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import compiled
from .kernels import Kernel, MixtureKernel, PiecewiseLinearKernel, merge_segments, split_segments
from .sparsifier import _forward_delta, _sparse_delta, competition_threshold, sparsify


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
        if mode == "none" or (mode == "mask" and t is None):
            gd = g
        elif mode == "mask":  # the survivors pass the gradient unchanged
            gd = (dw.abs() > t).to(g.dtype).mul_(g)
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
# The same maths fused by torch.compile (trimtune.tuners.snell.compiled): a unit takes it when
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
    plain = 1.0 if mode == "none" or (mode == "mask" and t is None) else \
        2.0 if mode == "mask" else 0.0
    return tt, sub, two, like.new_tensor(plain)


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
