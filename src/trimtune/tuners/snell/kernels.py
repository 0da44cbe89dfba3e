"""Kernels that "merge" two low-rank factors into a full weight update (SNELL / SNELLA).

A kernel maps the factors ``A`` (d_in, r) and ``B`` (d_out, r) to ``dW`` (d_in, d_out) with
``dW[i, j] = k(A[i], B[j])``. The inner product ``A @ B.T`` is LoRA (rank <= r); a non-linear
kernel gives a high-rank ``dW`` from the same ``r * (d_in + d_out)`` numbers.

Every kernel also accepts the authors' 3-D segment layout ``(P, d, r / P)``; a 2-D factor
``(d, r)`` is split into ``P`` contiguous column blocks of ``r / P`` (``A[:, p*r/P:(p+1)*r/P]``).

Distances are computed as ``sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=eps))`` instead of
``torch.cdist``: ``cdist``'s gradient is NaN at zero distance, the clamp makes it zero there,
so rows of ``A`` and ``B`` that coincide still give finite gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import TrimtuneError
from ...names import KERNELS


def safe_cdist(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances with a finite gradient everywhere.

    Args:
        x: (..., n, d).
        y: (..., m, d).
        eps: floor of the squared distance; below it the gradient is zero, not NaN.

    Returns:
        (..., n, m) with ``out[..., i, j] = ||x[i] - y[j]||_2`` (``sqrt(eps)`` at zero).
    """
    yy = (y * y).sum(-1).unsqueeze(-2)  # (..., 1, m)
    # |y|^2 - 2 x.y in one fused matmul (two full-size passes fewer than the plain expression)
    cross = torch.baddbmm(yy, x, y.mT, alpha=-2) if x.dim() == 3 else torch.addmm(
        yy, x, y.mT, alpha=-2) if x.dim() == 2 else yy - 2 * (x @ y.mT)
    return (cross + (x * x).sum(-1, keepdim=True)).clamp(min=eps).sqrt()


def split_segments(f: torch.Tensor, segments: int) -> torch.Tensor:
    """(d, r) -> (P, d, r / P) contiguous column blocks; a 3-D input is returned as is."""
    if f.dim() == 3:
        if f.shape[0] != segments:
            raise TrimtuneError(f"factor has {f.shape[0]} segments, kernel expects {segments}: "
                                "build the kernel with the same `segments`")
        return f
    d, r = f.shape
    if r % segments:
        raise TrimtuneError(f"rank {r} is not divisible by segments={segments}: "
                            "choose a rank that is a multiple of segments")
    return f.reshape(d, segments, r // segments).transpose(0, 1)


def merge_segments(f: torch.Tensor) -> torch.Tensor:
    """(P, d, r / P) -> (d, r), the inverse of :func:`split_segments`; 2-D passes through."""
    return f if f.dim() == 2 else f.transpose(0, 1).reshape(f.shape[1], -1)


def alternating_coeffs(segments: int, scale: float = 0.1) -> torch.Tensor:
    """``c_p = scale * (-1)^p``: ``(+0.1, -0.1)`` for P = 2 as in the authors' code.

    For general P the signs keep alternating (+, -, +, ...), so that for even P the kernel
    is a difference of equally many distance terms (the P = 2 construction repeated).
    """
    return scale * torch.tensor([(-1.0) ** p for p in range(segments)])


def piecewise_delta(a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor, segments: int
                    ) -> torch.Tensor:
    """``sum_p c_p cdist(A_p, B_p)``: :class:`PiecewiseLinearKernel` as a pure function."""
    a3, b3 = split_segments(a, segments), split_segments(b, segments)
    dist = safe_cdist(a3, b3)  # (P, d_in, d_out)
    return torch.einsum("p,pij->ij", coeffs.to(dist.dtype), dist)


def mixture_delta(a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor, alpha: torch.Tensor,
                  gamma: torch.Tensor, beta: torch.Tensor, segments: int) -> torch.Tensor:
    """``K + alpha softmax(K / gamma) + beta``: :class:`MixtureKernel` as a pure function."""
    k = piecewise_delta(a, b, coeffs, segments)
    return k + alpha * torch.softmax(k / gamma, dim=-1) + beta


class Kernel(nn.Module):
    """Base class: ``forward(A, B) -> dW``.

    Shape:
        - A: (d_in, r) or (P, d_in, r / P)
        - B: (d_out, r) or (P, d_out, r / P)
        - Output: (d_in, d_out)
    """

    name = "kernel"

    def __init__(self, segments: int = 1) -> None:
        super().__init__()
        self.segments = segments

    def extra_repr(self) -> str:
        return f"segments={self.segments}"


class PiecewiseLinearKernel(Kernel):
    """SNELL's default kernel: ``k(a, b) = sum_p c_p ||a_p - b_p||_2``.

    With P = 2 and ``c = (+0.1, -0.1)``: ``dW = 0.1 * (cdist(A1, B1) - cdist(A2, B2))``.

    Args:
        segments: P, the number of column blocks of the factors (rank must divide by it).
        learnable_coeffs: ``False`` keeps ``c`` fixed (authors' code, a buffer);
            ``True`` makes it an ``nn.Parameter`` (the paper).
        scale: magnitude of the alternating coefficients.
    """

    name = "piecewise"

    def __init__(self, segments: int = 2, learnable_coeffs: bool = False,
                 scale: float = 0.1) -> None:
        super().__init__(segments)
        c = alternating_coeffs(segments, scale)
        if learnable_coeffs:
            self.coeffs = nn.Parameter(c)
        else:
            self.register_buffer("coeffs", c)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return piecewise_delta(a, b, self.coeffs, self.segments)


class MixtureKernel(PiecewiseLinearKernel):
    """SNELLA's mixture: ``dW = K + alpha * softmax(K / gamma, dim=-1) + beta``.

    ``K`` is the piecewise-linear kernel; the softmax runs over output units (the last dim of
    the (d_in, d_out) update). ``alpha = 1, gamma = 1, beta = 0`` at init, learnable, one set
    per kernel (i.e. per adapted weight block).
    """

    name = "mixture"

    def __init__(self, segments: int = 2, learnable_coeffs: bool = False,
                 scale: float = 0.1) -> None:
        super().__init__(segments, learnable_coeffs, scale)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mixture_delta(a, b, self.coeffs, self.alpha, self.gamma, self.beta,
                             self.segments)


class InnerProductKernel(Kernel):
    """LoRA's update ``dW = A @ B.T`` (rank <= r), for ablations."""

    name = "inner"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return merge_segments(a) @ merge_segments(b).T


class RBFKernel(Kernel):
    """``k(a, b) = scale * exp(-||a - b||^2 / (2 sigma^2))`` (SNELL ablation).

    ``sigma = 1`` and ``scale = 0.1`` (the same scale as the piecewise coefficients), so the
    update starts small. The SNELL paper reports this kernel degrades accuracy.
    """

    name = "rbf"

    def __init__(self, sigma: float = 1.0, scale: float = 0.1) -> None:
        super().__init__()
        self.sigma, self.scale = sigma, scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a2, b2 = merge_segments(a), merge_segments(b)
        sq = ((a2 * a2).sum(-1, keepdim=True) + (b2 * b2).sum(-1) - 2 * a2 @ b2.T).clamp(min=0)
        return self.scale * torch.exp(-sq / (2 * self.sigma**2))


class SigmoidKernel(Kernel):
    """``k(a, b) = scale * tanh(a . b + c)`` (the "sigmoid" kernel of SVMs; SNELL ablation).

    ``scale = 0.1``, ``c = 0``, so the update starts near ``0.1 * A @ B.T``.
    """

    name = "sigmoid"

    def __init__(self, offset: float = 0.0, scale: float = 0.1) -> None:
        super().__init__()
        self.offset, self.scale = offset, scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(merge_segments(a) @ merge_segments(b).T + self.offset)


def create_kernel(name: str, segments: int = 2, learnable_coeffs: bool = False) -> Kernel:
    """Build a kernel by name: ``piecewise``, ``mixture``, ``inner``, ``rbf`` or ``sigmoid``."""
    if name == "piecewise":
        return PiecewiseLinearKernel(segments, learnable_coeffs)
    if name == "mixture":
        return MixtureKernel(segments, learnable_coeffs)
    if name == "inner":
        return InnerProductKernel()
    if name == "rbf":
        return RBFKernel()
    if name == "sigmoid":
        return SigmoidKernel()
    raise TrimtuneError(f"unknown kernel {name!r}: use one of {', '.join(KERNELS)}")
