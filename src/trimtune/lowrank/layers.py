"""The factorised linear layer of PELA and its truncated-SVD initialisation.

A dense ``nn.Linear`` with weight ``W`` (out x in) becomes two linears with no activation in
between::

    x (..., in) -> first: Linear(in, r, bias=False) -> (..., r)
                -> second: Linear(r, out, bias=<original bias>) -> (..., out)

so ``W ~= W2 @ W1`` with ``W1 = sqrt(S_r) V_r^T`` (r x in) and ``W2 = U_r sqrt(S_r)`` (out x r):
the optimal rank-r approximation (Eckart-Young) with the singular values split evenly, so the
two factors have equal Frobenius norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import TrimtuneError

SvdMethod = Literal["full", "gram", "randomized"]


def gram(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The smaller Gram matrix of one (out x in) ``weight``: ``W^T W`` if tall, ``W W^T`` if
    wide, in ``dtype``. Only its LOWER triangle is guaranteed (what ``torch.linalg.eigh``
    reads): on the CPU it is BLAS's symmetric rank-k update (``?syrk`` through SciPy), half
    the multiply-adds of a full product; elsewhere the full product."""
    w = weight.detach().to(dtype)
    tall = w.shape[-2] >= w.shape[-1]
    if w.device.type == "cpu" and w.dim() == 2 and dtype in (torch.float32, torch.float64):
        from scipy.linalg import blas

        syrk = blas.ssyrk if dtype == torch.float32 else blas.dsyrk
        a = w.contiguous().numpy().T  # (in x out), Fortran order: no copy
        # tall: W^T W = a a^T (trans=0); wide: W W^T = a^T a (trans=1)
        return torch.from_numpy(syrk(1.0, a, trans=0 if tall else 1, lower=1))
    return w.mT @ w if tall else w @ w.mT


def gram_eigh(weight: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and the smaller side's singular vectors of ``weight`` through the
    eigen-decomposition of its smaller Gram matrix (``W^T W`` if tall, ``W W^T`` if wide).

    Batched: ``weight`` may be (..., out, in), e.g. the stacked same-shape layers of a model,
    decomposed in one call.

    Returns:
        ``S`` (..., k) descending and ``vec`` (..., k, k), its columns the matching right
        (tall) or left (wide) singular vectors, in ``dtype``.
    """
    ev, vec = torch.linalg.eigh(gram(weight, dtype))  # ascending; reads the lower triangle
    return ev.flip(-1).clamp_min(0).sqrt(), vec.flip(-1)


def gram_eigh_many(weights: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32,
                   workers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gram_eigh` of each of ``weights`` (CPU: one layer per task on ``workers``
    threads, default ``torch.get_num_threads()``, each task single-threaded).

    On the CPU LAPACK's ``syevd`` gains little from a second thread on one 768 x 768 matrix,
    and on a machine shared with other jobs its many small threaded calls stall on each other
    (measured: 12 such decompositions 0.8 s of CPU single-threaded, 10-20 s with 2 threads);
    independent layers on single-threaded workers keep every core busy instead.
    Off the CPU: one batched call per group of same-shape weights.
    """
    weights = list(weights)
    if not weights:
        return []
    if weights[0].device.type != "cpu":
        out: list = [None] * len(weights)
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(weights):
            groups.setdefault((tuple(w.shape), w.device), []).append(i)
        for idx in groups.values():
            s, vec = gram_eigh(torch.stack([weights[i].detach() for i in idx]), dtype)
            for j, i in enumerate(idx):
                out[i] = (s[j], vec[j])
        return out
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    workers = max(1, min(workers or n, len(weights)))
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda w: gram_eigh(w, dtype), weights))
    finally:
        torch.set_num_threads(n)


def svd_from_gram(weight: torch.Tensor, s: torch.Tensor, vec: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S, Vh_r)`` of one (out x in) ``weight`` from its :func:`gram_eigh` output.

    The other side is ``W V_r`` (or ``U_r^T W``) normalised, and the leading ``rank`` singular
    values are recomputed as its column norms: accurate to the working precision even where
    the Gram matrix's eigenvalues are not (a singular value 1e-4 of the largest has an
    eigenvalue 1e-8, below float32's resolution). So ``U_r S_r Vh_r`` is exactly the
    projection ``W V_r V_r^T``, at full rank ``W`` itself.

    Returns:
        ``U`` (out x rank), ``S`` (k,): ``s`` with its first ``rank`` entries recomputed, and
        ``Vh`` (rank x in).
    """
    w = weight.detach().to(vec.dtype)
    tiny = 1e-300 if vec.dtype == torch.float64 else 1e-30
    if w.shape[0] >= w.shape[1]:  # vec = V (in x in)
        wv = w @ vec[:, :rank]
        s_r = wv.norm(dim=0)
        u, vh = wv / s_r.clamp_min(tiny), vec[:, :rank].mT
    else:                          # vec = U (out x out)
        u = vec[:, :rank]
        uw = u.mT @ w
        s_r = uw.norm(dim=1)
        vh = uw / s_r.clamp_min(tiny)[:, None]
    return u, torch.cat([s_r, s[rank:].to(s_r.dtype)]), vh


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    svd: SvdMethod = "full",
    dtype: torch.dtype = torch.float32,
    niter: int = 4,
    oversample: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of ``weight`` (out x in), computed on its device.

    Args:
        weight: matrix of shape (out, in).
        rank: number of singular triplets to keep, 1 <= rank <= min(out, in).
        svd: ``"full"`` (``torch.linalg.svd``), ``"gram"`` (:func:`gram_eigh`: ``eigh`` of the
            smaller Gram matrix, several times faster on CPU; ``U_r S_r V_r^T`` is then
            ``W V_r V_r^T``, the exact projection, however small the dropped values) or
            ``"randomized"`` (``torch.svd_lowrank``, for very large layers; its spectrum has
            only ``rank + oversample`` values).
        dtype: dtype the decomposition runs in. float32 is exact enough for the gram path on
            trained weights (the rank-r error stays within 1e-4 of Eckart-Young's, tested);
            float64 for bit-exact work.

    Returns:
        ``U`` (out x rank), ``S`` (k,) with k >= rank: every singular value computed, descending,
        and ``Vh`` (rank x in).
    """
    w = weight.detach().to(dtype)
    if svd == "full":
        if w.shape[0] < w.shape[1]:  # LAPACK is faster on tall matrices: SVD of W^T
            v, s, uh = torch.linalg.svd(w.mT, full_matrices=False)
            u, vh = uh.mT, v.mT
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
    elif svd == "gram":
        s, vec = gram_eigh(w, dtype)
        u, s, vh = svd_from_gram(w, s, vec, rank)
    elif svd == "randomized":
        q = min(rank + oversample, min(w.shape))
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        vh = v.mT
    else:
        raise TrimtuneError(f"unknown svd method {svd!r}: use 'auto', 'full', 'gram' or "
                            "'randomized'")
    return u[:, :rank], s, vh[:rank]


def whitening_factor(gram: torch.Tensor, damp: float = 1e-6, max_tries: int = 12
                     ) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``S`` of the damped Gram matrix: ``S S^T = G + lam * I``.

    ``lam = damp * mean(diag(G))`` (relative, so it does not depend on the activation scale);
    if ``G`` is too ill-conditioned for the Cholesky factorisation (rank-deficient: fewer
    calibration tokens than inputs, or dead input channels), ``damp`` grows tenfold until it
    succeeds. An all-zero or non-finite ``G`` gives ``S = I`` and damp 0 (nothing usable seen:
plain SVD).

    Args:
        gram: ``X^T X`` (in x in), any float dtype; factorised in float64.
        damp: relative damping of the first try.

    Returns:
        ``(S (in x in, float64, lower triangular), damp used)``.
    """
    g = gram.detach().double()
    g = (g + g.mT) / 2
    scale = float(g.diagonal().mean())
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    if not scale > 0 or not torch.isfinite(g).all():
        return eye, 0.0
    d = float(damp)
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(g + (d * scale) * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            return chol, d
        d = max(d * 10, 1e-12)
    return eye, 0.0  # pragma: no cover - damping reached 1e6 without success: plain SVD


def activation_scale(abs_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's input-channel scale ``mean|x|^alpha`` (in,), float64; channels that never fired
    get the smallest positive scale (1e-6 of the largest) so the fold-back stays finite."""
    s = abs_mean.detach().double().clamp_min(0) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    if not top > 0:
        return torch.ones_like(s)
    return s.clamp_min(top * 1e-6)


def weighted_target(weight: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """``W @ S`` in float64 (``S``: an (in x in) matrix, an (in,) diagonal, or None: ``W``)."""
    w = weight.detach().double()
    if right is None:
        return w
    right = right.to(w.device, torch.float64)
    return w * right if right.dim() == 1 else w @ right


class LowRankLinear(nn.Module):
    """``nn.Linear(in, out)`` factorised as ``second(first(x))`` through a rank-``r`` bottleneck.

    Args:
        in_features: input size.
        out_features: output size.
        rank: bottleneck size r; parameters r * (in + out) (+ out for the bias).
        bias: whether ``second`` carries a bias (the original layer's bias).

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not (isinstance(rank, int) and 1 <= rank <= min(in_features, out_features)):
            raise TrimtuneError(
                f"rank {rank!r} does not fit a {in_features}->{out_features} layer: "
                f"use an integer between 1 and {min(in_features, out_features)}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense weight ``W2 @ W1`` this layer computes, shape (out, in)."""
        return self.second.weight @ self.first.weight

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (W = W2 @ W1, same bias)."""
        w = self.second.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight_product)
            if self.second.bias is not None:
                dense.bias.copy_(self.second.bias)
        return dense

    @classmethod
    def _uninitialised(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """A layer shaped for ``linear`` at ``rank`` whose values are about to be overwritten:
        built on the meta device and given empty storage (no random init to throw away)."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                   device="meta", dtype=w.dtype).to_empty(device=w.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, svd: SvdMethod = "full",
                    svd_dtype: torch.dtype = torch.float32,
                    return_spectrum: bool = False):
        """Factorise ``linear`` by truncated SVD, singular values split evenly.

        Args:
            linear: the dense layer (weight out x in); left unchanged.
            rank: bottleneck size r.
            svd: ``"full"``, ``"gram"`` or ``"randomized"`` (see :func:`truncated_svd`).
            svd_dtype: dtype the SVD runs in; the factors take ``linear.weight``'s dtype.
            return_spectrum: also return the computed singular values (descending, float32).

        Returns:
            the new ``LowRankLinear`` (on ``linear``'s device), or ``(layer, S)``.
        """
        u, s, vh = truncated_svd(linear.weight, rank, svd=svd, dtype=svd_dtype)
        layer = cls.from_svd(linear, u, s, vh, rank)
        if return_spectrum:
            return layer, s.detach().float().cpu()
        return layer

    @classmethod
    def from_svd(cls, linear: nn.Linear, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                 rank: int) -> LowRankLinear:
        """Build the layer from a precomputed SVD of ``linear.weight``: ``u`` (out x >=rank),
        ``s`` (>=rank,), ``vh`` (>=rank x in); bias copied from ``linear``."""
        w = linear.weight
        layer = cls._uninitialised(linear, rank)
        u, vh = u[:, :rank], vh[:rank]
        root = s[:rank].sqrt()
        with torch.no_grad():
            layer.first.weight.copy_(root[:, None] * vh)     # (r, in)
            layer.second.weight.copy_(u * root[None, :])     # (out, r)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        for p in layer.parameters():
            p.requires_grad_(w.requires_grad)
        return layer

    @classmethod
    def from_weighted_svd(cls, linear: nn.Linear, u: torch.Tensor, s: torch.Tensor, rank: int
                          ) -> LowRankLinear:
        """Build the layer from the SVD ``U diag(s) V^T`` of a weighted weight ``W S`` (``S``
        invertible: the whitening factor or ASVD's diagonal scale).

        The factors are SVD-LLM's, ``second = U_r sqrt(s_r)`` and ``first = sqrt(s_r) V_r^T
        S^-1``, with ``S^-1`` folded back through the identity ``sqrt(s_r) V_r^T S^-1 =
        s_r^-1/2 U_r^T W`` (from ``U^T W S = diag(s) V^T``), so no inverse of an
        ill-conditioned ``S`` is ever formed: the product is ``U_r U_r^T W``, the projection of
        ``W`` on the leading output directions of the calibration data, never larger than ``W``.
        Directions with ``s ~ 0`` (a rank-deficient ``W``) get zero factors.
        """
        w = linear.weight
        layer = cls._uninitialised(linear, rank)
        u = u[:, :rank].to(w.device, torch.float64)
        s = s[:rank].to(w.device, torch.float64)
        ok = s > float(s[0]) * 1e-10 if len(s) else s > 0
        root = torch.where(ok, s.clamp_min(1e-300).sqrt(), torch.zeros_like(s))
        inv_root = torch.where(ok, 1.0 / root.clamp_min(1e-300), torch.zeros_like(s))
        first = inv_root[:, None] * (u.mT @ w.detach().double())   # (r, in)
        second = u * root[None, :]                                   # (out, r)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        for p in layer.parameters():
            p.requires_grad_(w.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.second.bias is not None}")


def is_compressed(model: nn.Module) -> bool:
    """True if ``model`` contains at least one :class:`LowRankLinear`."""
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def factorised_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """``{qualified name: LowRankLinear}`` in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
