"""Kernels: formula against an explicit double loop, finite gradients at zero distance."""

import pytest
import torch

from trimtune.errors import TrimtuneError
from trimtune.tuners.snell.kernels import (
    InnerProductKernel,
    MixtureKernel,
    PiecewiseLinearKernel,
    RBFKernel,
    SigmoidKernel,
    create_kernel,
    split_segments,
)

D_IN, D_OUT, R = 5, 7, 4


def factors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D_IN, R, generator=g, dtype=dtype),
            torch.randn(D_OUT, R, generator=g, dtype=dtype))


def loop(a, b, k):
    return torch.tensor([[k(a[i], b[j]) for j in range(b.shape[0])] for i in range(a.shape[0])],
                        dtype=a.dtype)


def piecewise_k(a, b, c=(0.1, -0.1), segments=2):
    w = a.shape[0] // segments
    return sum(c[p] * torch.linalg.vector_norm(a[p * w:(p + 1) * w] - b[p * w:(p + 1) * w])
               for p in range(segments))


def test_piecewise_matches_loop():
    a, b = factors()
    out = PiecewiseLinearKernel(2).double()(a, b)
    assert out.shape == (D_IN, D_OUT)
    torch.testing.assert_close(out, loop(a, b, piecewise_k), atol=1e-6, rtol=1e-6)


def test_piecewise_four_segments_alternate_signs():
    a, b = factors(1)
    out = PiecewiseLinearKernel(4).double()(a, b)
    ref = loop(a, b, lambda x, y: piecewise_k(x, y, (0.1, -0.1, 0.1, -0.1), 4))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_mixture_matches_loop_with_row_softmax():
    a, b = factors(2)
    kern = MixtureKernel(2).double()
    with torch.no_grad():
        kern.alpha.fill_(0.7)
        kern.gamma.fill_(1.3)
        kern.beta.fill_(0.05)
    kmat = loop(a, b, piecewise_k)
    ref = kmat + 0.7 * torch.exp(kmat / 1.3) / torch.exp(kmat / 1.3).sum(1, keepdim=True) + 0.05
    torch.testing.assert_close(kern(a, b), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kern,k", [
    (InnerProductKernel(), lambda x, y: x @ y),
    (RBFKernel(), lambda x, y: 0.1 * torch.exp(-((x - y) ** 2).sum() / 2)),
    (SigmoidKernel(), lambda x, y: 0.1 * torch.tanh(x @ y)),
])
def test_other_kernels_match_loop(kern, k):
    a, b = factors(3)
    torch.testing.assert_close(kern(a, b), loop(a, b, k), atol=1e-6, rtol=1e-6)


def test_three_d_segment_form_equals_two_d():
    a, b = factors(4)
    kern = PiecewiseLinearKernel(2).double()
    torch.testing.assert_close(kern(split_segments(a, 2), split_segments(b, 2)), kern(a, b))


@pytest.mark.parametrize("name", ["piecewise", "mixture", "rbf"])
def test_grads_finite_when_rows_coincide(name):
    a, b = factors(5, torch.float32)
    b[:3] = a[:3]  # zero distance between A[i] and B[i] for i < 3
    a.requires_grad_(True)
    b.requires_grad_(True)
    kern = create_kernel(name, 2, learnable_coeffs=True)
    kern(a, b).square().sum().backward()
    grads = [a.grad, b.grad] + [p.grad for p in kern.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_learnable_coeffs_are_parameters_fixed_are_buffers():
    assert "coeffs" in dict(PiecewiseLinearKernel(2, learnable_coeffs=True).named_parameters())
    fixed = PiecewiseLinearKernel(2)
    assert not list(fixed.parameters()) and "coeffs" in dict(fixed.named_buffers())


def test_bad_kernel_inputs():
    with pytest.raises(TrimtuneError, match="unknown kernel"):
        create_kernel("cosine")
    a, b = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(TrimtuneError, match="not divisible"):
        PiecewiseLinearKernel(2)(a, b)
