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
- ``"mask"`` (an option beyond the authors): ``dW_s = dW * 1[|dW| > t]``, the survivors as
  they are (gradient 1 on them): the competition without the squaring, so the update grows
  linearly in the factors as LoRA's does instead of quadratically;
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
``torch.compile``-fused loops (:mod:`.compiled`; ``TRIMTUNE_COMPILE=0`` turns
it off, ``1`` forces it everywhere) instead of ~20 ATen passes over the (d_in, d_out) update;
the threshold is still an exact k-th value (:func:`~.sparsifier.kth_smallest`, a sampled bracket
refined exactly on the CPU). Small units (tests, tiny models) stay on the eager closed form.

A :class:`SparseDelta` is one (A, B, kernel, sparsity) unit for one (d_in, d_out) block; the
PEFT layer :class:`~trimtune.tuners.snell.layer.SnellLinear` wraps the frozen base linear and
concatenates the outputs of its units (one unit, or three for timm's fused ``qkv``: separate
q, k, v updates as the authors).
The SNELLA allocator iterates the ``SparseDelta`` modules of a model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import TrimtuneError
from .autograd import SparseDeltaFunction
from .kernels import Kernel
from .sparsifier import SPARSIFY, check_sparsity, competition_threshold, num_zeroed, sparsify


class SparseDelta(nn.Module):
    """One sparse kernelised update for a (d_in, d_out) weight block.

    Args:
        in_features: d_in.
        out_features: d_out.
        rank: r, columns of ``snell_A`` / ``snell_B``.
        kernel: a :class:`~trimtune.tuners.snell.kernels.Kernel` (its parameters live under
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
                 init_scale: float = 1.0, b_init_scale: float = 1.0) -> None:
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
        self.b_init_scale = float(b_init_scale)
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
        ``init_scale``, 1 by default; ``snell_B`` also times ``b_init_scale``, 0 = LoRA's zero
        start)."""
        p = max(1, self.kernel.segments)
        for f in (self.snell_A, self.snell_B):
            f3 = torch.empty(p, f.shape[0], self.rank // p)
            nn.init.kaiming_uniform_(f3, a=math.sqrt(5))
            with torch.no_grad():
                f.copy_(f3.transpose(0, 1).reshape(f.shape))
                if self.init_scale != 1.0:
                    f.mul_(self.init_scale)
                if f is self.snell_B and self.b_init_scale != 1.0:
                    f.mul_(self.b_init_scale)

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


__all__ = ["SparseDelta"]
