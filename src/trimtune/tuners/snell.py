"""The kernelised sparse delta layer of SNELL / SNELLA.

A frozen ``nn.Linear`` (weight W, out x in) gains a sparse, high-rank update learned through
two small factors::

    dW   = kernel(A, B)                 (d_in, d_out)  A: (d_in, r), B: (d_out, r)
    dW_s = sparsify(dW, s)              a fraction s of the entries is zero
    y    = base(x) + DropPath(dropout(x) @ dW_s)

Sparsification is a competition by magnitude, recomputed at every forward (nothing stored):
``t = kthvalue(|dW|.flatten(), k)``, ``k = floor(s * d_in * d_out)``, then

- ``"code"`` (default, the authors' code): ``dW_s = dW * |dW| * 1[|dW| > t]``;
- ``"soft"`` (the paper, Eq. 5): ``dW_s = dW * max(|dW| - t, 0)``;
- ``"none"``: ``dW_s = dW`` (plain kernel update; what the SNELL code does at s = 0).

At ``s = 0`` "code" and "soft" both give the squared form ``dW * |dW|`` (as the SNELLA code).

The dense ``dW`` (the size of the weight) is not kept for backward: :class:`SparseDeltaFunction`
saves only ``x``, ``A``, ``B``, the kernel's parameters and the threshold, and recomputes
``dW`` in the backward pass (as the authors' activation checkpointing, without a second
forward of the rest of the branch).

A :class:`SparseDelta` is one (A, B, kernel, sparsity) unit for one (d_in, d_out) block; a
:class:`SnellLinear` wraps the frozen base linear and concatenates the outputs of its units
(one unit, or three for timm's fused ``qkv``: separate q, k, v updates as the authors).
The SNELLA allocator iterates the ``SparseDelta`` modules of a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn
from torch.func import functional_call

from ..errors import TrimtuneError
from .kernels import Kernel, split_segments

SPARSIFY = ("code", "soft", "none")


def check_sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise TrimtuneError(f"sparsity {s} is outside [0, 1): give the fraction of update "
                            "entries to zero, e.g. 0.5")
    return s


def num_zeroed(sparsity: float, numel: int) -> int:
    """``k = floor(s * numel)`` (with a 1e-9 guard against 0.29 * 100 = 28.999...)."""
    return min(numel, int(math.floor(sparsity * numel + 1e-9)))


def magnitude_threshold(dw: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th smallest ``|dW|`` (detached), ``k = floor(s * numel)``; 0 when k = 0.

    ``torch.kthvalue`` is a selection, not a sort, and has no element-count limit
    (``torch.quantile`` refuses inputs above 16M elements).
    """
    k = num_zeroed(sparsity, dw.numel())
    if k == 0:
        return dw.new_zeros(())
    return dw.detach().abs().flatten().kthvalue(k).values


def sparsify(dw: torch.Tensor, threshold: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """Apply the magnitude competition to ``dW`` given its threshold ``t``.

    Args:
        dw: (d_in, d_out) dense update.
        threshold: scalar t (no gradient flows through it).
        mode: ``"code"``, ``"soft"`` or ``"none"`` (see the module docstring).

    Returns:
        (d_in, d_out) with every entry ``|dW| <= t`` exactly zero (``"none"``: ``dW``).
    """
    if mode == "code":
        a = dw.abs()
        return dw * a * (a > threshold)
    if mode == "soft":
        return dw * (dw.abs() - threshold).clamp(min=0)
    if mode == "none":
        return dw
    raise TrimtuneError(f"unknown sparsify mode {mode!r}: use one of {', '.join(SPARSIFY)}")


class SparseDeltaFunction(torch.autograd.Function):
    """``y = x @ sparsify(kernel(A, B))`` that recomputes ``dW`` in backward.

    Saved for backward: ``x``, ``A``, ``B``, the kernel's parameters and the scalar threshold;
    memory ``O(batch activations + r (d_in + d_out))``, never ``O(d_in * d_out)``.
    """

    @staticmethod
    def forward(ctx, x, a, b, kernel: Kernel, sparsity: float, mode: str, names, *kparams):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            dw = functional_call(kernel, dict(zip(names, kparams)), (a, b))
            t = magnitude_threshold(dw, sparsity)
            dws = sparsify(dw, t, mode)
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
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(f) for v, f in zip(leaves, flags)]
            dw = functional_call(ctx.kernel, dict(zip(ctx.names, leaves[2:])),
                                 (leaves[0], leaves[1]))
            dws = sparsify(dw, t, ctx.mode)
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


class SparseDelta(nn.Module):
    """One sparse kernelised update for a (d_in, d_out) weight block.

    Args:
        in_features: d_in.
        out_features: d_out.
        rank: r, columns of ``snell_A`` / ``snell_B``.
        kernel: a :class:`~trimtune.tuners.kernels.Kernel` (its parameters live under
            ``kernel.*``, e.g. ``kernel.alpha``).
        sparsity: s in [0, 1), fraction of entries zeroed; settable at any time.
        sparsify: ``"code"``, ``"soft"`` or ``"none"``.
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
                 sparsity: float = 0.0, sparsify: str = "code", recompute: bool = True) -> None:
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
        self.sparsity = sparsity
        self.snell_A = nn.Parameter(torch.empty(in_features, rank))
        self.snell_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @property
    def sparsity(self) -> float:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, s: float) -> None:
        self._sparsity = check_sparsity(s)

    @property
    def numel_update(self) -> int:
        return self.in_features * self.out_features

    def reset_parameters(self) -> None:
        """``kaiming_uniform_(a=sqrt(5))`` on the 3-D (P, d, r/P) view, as the authors."""
        p = max(1, self.kernel.segments)
        for f in (self.snell_A, self.snell_B):
            f3 = torch.empty(p, f.shape[0], self.rank // p)
            nn.init.kaiming_uniform_(f3, a=math.sqrt(5))
            with torch.no_grad():
                f.copy_(f3.transpose(0, 1).reshape(f.shape))

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
        return sparsify(dw, magnitude_threshold(dw, self.sparsity), self.sparsify_mode)

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


class SnellLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the concatenated outputs of its :class:`SparseDelta` units.

    ``out = base(x) + DropPath(cat([u(dropout(x)) for u in units], -1))``; unit ``i`` covers
    output rows ``out_splits[i]`` of the weight (for a fused qkv: three units of d/3).

    Args:
        base: the layer to adapt; its parameters are frozen, never modified except by
            :meth:`merge` / :meth:`unmerge`.
        units: the updates; their ``out_features`` must sum to ``base.out_features`` and each
            ``in_features`` must equal ``base.in_features``.
        dropout: dropout probability on the branch input.
        drop_path: DropPath probability on the branch output (timm's, per sample).

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)
    """

    def __init__(self, base: nn.Linear, units: Sequence[SparseDelta], dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if sum(u.out_features for u in units) != base.out_features or any(
                u.in_features != base.in_features for u in units):
            raise TrimtuneError(f"delta units {[(u.in_features, u.out_features) for u in units]} "
                                f"do not tile a {base.in_features}->{base.out_features} layer")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.snell_units = nn.ModuleList(units)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.merged = False

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x)
        parts = [u(h) for u in self.snell_units]
        branch = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y + self.drop_path(branch).to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The whole update in weight layout, (out_features, in_features)."""
        return torch.cat([u.delta_weight() for u in self.snell_units], dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + dW_s^T`` (the eval-mode update); forward then skips the branch."""
        if not self.merged:
            w = self.base.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, ``W <- W - dW_s^T`` (exact up to float rounding)."""
        if self.merged:
            w = self.base.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


__all__ = ["SparseDelta", "SnellLinear", "SparseDeltaFunction", "magnitude_threshold",
           "sparsify", "num_zeroed", "split_segments"]
