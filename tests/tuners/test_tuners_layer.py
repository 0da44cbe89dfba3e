"""Sparse delta layer: mask counts, competition, gradients, memory saved for backward, merge."""

import math

import pytest
import torch
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.tuners.snell.kernels import create_kernel
from trimtune.tuners.snell.layer import SnellLinear
from trimtune.tuners.snell.delta import SparseDelta
from trimtune.tuners.snell.sparsifier import kth_smallest, magnitude_threshold, sparsify


def unit(d_in=6, d_out=10, rank=4, kernel="piecewise", sparsity=0.5, mode="code", seed=0,
         recompute=True):
    torch.manual_seed(seed)
    return SparseDelta(d_in, d_out, rank, create_kernel(kernel, 2), sparsity=sparsity,
                       sparsify=mode, recompute=recompute)


@pytest.mark.parametrize("mode", ["code", "soft", "mask"])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.75, 0.99])
def test_number_of_zeros_is_floor_s_mn(mode, s):
    u = unit(sparsity=s, mode=mode)
    dws = u.delta()
    assert dws.shape == (6, 10)
    assert int((dws == 0).sum()) == math.floor(s * 60 + 1e-9)


def test_sparsify_forms():
    dw = torch.tensor([[0.5, -0.2], [0.1, -0.9]])
    t = magnitude_threshold(dw, 0.5)  # k = 2 -> t = 0.2
    assert float(t) == pytest.approx(0.2)
    torch.testing.assert_close(sparsify(dw, t, "code"), torch.tensor([[0.25, 0.0], [0.0, -0.81]]))
    torch.testing.assert_close(sparsify(dw, t, "soft"), torch.tensor([[0.15, 0.0], [0.0, -0.63]]))
    torch.testing.assert_close(sparsify(dw, magnitude_threshold(dw, 0.0), "code"), dw * dw.abs())
    torch.testing.assert_close(sparsify(dw, t, "none"), dw)
    torch.testing.assert_close(sparsify(dw, t, "mask"), torch.tensor([[0.5, 0.0], [0.0, -0.9]]))
    torch.testing.assert_close(sparsify(dw, None, "mask"), dw)


def test_mask_sparsifier_is_linear_in_the_update_with_gradient_one_on_survivors():
    # "mask" keeps the competition but not the squaring: doubling dW doubles dW_s (code: x4),
    # and the gradient w.r.t. dW is exactly the survivors' indicator
    dw = torch.tensor([[0.5, -0.2], [0.1, -0.9]], requires_grad=True)
    t = magnitude_threshold(dw, 0.5)
    torch.testing.assert_close(sparsify(2 * dw, 2 * t, "mask"), 2 * sparsify(dw, t, "mask"))
    torch.testing.assert_close(sparsify(2 * dw, 2 * t, "code"), 4 * sparsify(dw, t, "code"))
    sparsify(dw, t, "mask").sum().backward()
    assert torch.equal(dw.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_kth_smallest_topk_equals_kthvalue(n):
    # the CUDA path (topk of the smaller side) must pick exactly kthvalue's entry, ties included
    g = torch.Generator().manual_seed(n)
    for v in (torch.randn(n, generator=g), torch.randint(0, 3, (n,), generator=g).float()):
        for k in sorted({1, max(1, n // 3), max(1, n // 2), n // 2 + 1, n}):
            want = v.kthvalue(k).values
            assert kth_smallest(v, k, "topk") == want
            assert kth_smallest(v, k, "auto") == want  # CPU: kthvalue


def test_mask_follows_current_factors():
    u = unit(sparsity=0.5)
    before = u.delta() != 0
    with torch.no_grad():
        u.snell_A.copy_(torch.randn_like(u.snell_A))
    after = u.delta() != 0
    assert not torch.equal(before, after)
    assert int((~after).sum()) == 30


def test_sparsity_settable_and_validated():
    u = unit(sparsity=0.2)
    u.sparsity = 0.9
    assert int((u.delta() == 0).sum()) == 54
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(TrimtuneError, match=r"\[0, 1\)"):
            u.sparsity = bad
    with pytest.raises(TrimtuneError, match="not divisible"):
        SparseDelta(6, 10, 3, create_kernel("piecewise", 2))


@pytest.mark.parametrize("kernel", ["piecewise", "mixture", "inner"])
@pytest.mark.parametrize("mode", ["code", "soft"])
def test_recomputing_backward_equals_plain_autograd(kernel, mode):
    x = torch.randn(3, 5, 6)
    grads = []
    for recompute in (True, False):
        u = unit(kernel=kernel, mode=mode, recompute=recompute)
        xi = x.clone().requires_grad_(True)
        y = u(xi)
        assert y.shape == (3, 5, 10)
        (y * torch.linspace(-1, 1, 10)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in u.parameters()])
    names = ["x"] + [n for n, _ in u.named_parameters()]
    for n, g1, g2 in zip(names, *grads):
        assert g1 is not None and torch.isfinite(g1).all(), n
        torch.testing.assert_close(g1, g2, msg=n)


def test_grads_reach_factors_and_kernel_not_frozen_base_even_at_zero_distance():
    torch.manual_seed(0)
    base = nn.Linear(6, 6)
    u = SparseDelta(6, 6, 4, create_kernel("mixture", 2), sparsity=0.3)
    with torch.no_grad():
        u.snell_B.copy_(u.snell_A)  # rows of A and B coincide: zero distances on the diagonal
    layer = SnellLinear.from_units(base, [u])
    layer(torch.randn(2, 6)).pow(2).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad
    for n, p in u.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert {n for n, _ in u.named_parameters()} == {
        "snell_A", "snell_B", "kernel.alpha", "kernel.gamma", "kernel.beta"}


def saved_bytes(fn):
    """Bytes of distinct tensors autograd saves while running ``fn``."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def branch_bytes(batch, rank, d=48):
    torch.manual_seed(0)
    u = SparseDelta(d, d, rank, create_kernel("mixture", 2), sparsity=0.5)
    x = torch.randn(batch, 3, d, requires_grad=True)
    return saved_bytes(lambda: u(x))


def test_saved_for_backward_scales_with_batch_and_rank_not_weight():
    d = 48
    b1, b2 = branch_bytes(1, 4), branch_bytes(2, 4)
    r8 = branch_bytes(1, 8)
    assert b2 - b1 == 3 * d * 4  # one more sample of activations (3 tokens x d float32)
    assert r8 - b1 == 4 * (2 * d) * 4  # r(m + n) more factor entries
    assert b1 < d * d * 4  # less than the dense update itself
    dense = SparseDelta(d, d, 4, create_kernel("mixture", 2), sparsity=0.5, recompute=False)
    x = torch.randn(1, 3, d, requires_grad=True)
    assert saved_bytes(lambda: dense(x)) > d * d * 4  # plain autograd keeps m*n tensors


def test_qkv_split_merge_unmerge():
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    w0 = base.weight.detach().clone()
    units = [SparseDelta(8, 4, 4, create_kernel("piecewise", 2), sparsity=s)
             for s in (0.0, 0.5, 0.9)]
    layer = SnellLinear.from_units(base, units, dropout=0.1, drop_path=0.1).eval()
    x = torch.randn(5, 8)
    y = layer(x)
    torch.testing.assert_close(y[:, 4:8], base(x)[:, 4:8] + x @ units[1].delta())
    assert layer.get_delta_weight("default").shape == (12, 8)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    with pytest.raises(TrimtuneError, match="do not tile"):
        SnellLinear.from_units(nn.Linear(8, 12), units[:2])


def snell_pair(kernel, mode, n_units, sparsities=(0.0, 0.4, 0.7), bias=True, d_in=6, d_out=9):
    """Two identical float64 SnellLinears, fused and unfused."""
    layers = []
    for fused in (True, False):
        torch.manual_seed(1)
        base = nn.Linear(d_in, d_out, bias=bias).double()
        units = [SparseDelta(d_in, d_out // n_units, 4, create_kernel(kernel, 2),
                             sparsity=sparsities[i % len(sparsities)] if n_units > 1
                             else sparsities[-1], sparsify=mode).double()
                 for i in range(n_units)]
        for u in units:  # kernel scalars away from init so their gradients are generic
            for p in u.kernel.parameters():
                p.data.add_(0.3)
        layers.append(SnellLinear.from_units(base, units, fused=fused))
    return layers


@pytest.mark.parametrize("kernel", ["piecewise", "mixture"])
@pytest.mark.parametrize("mode", ["code", "soft", "mask", "none"])
@pytest.mark.parametrize("n_units,bias", [(1, True), (3, True), (1, False)])
def test_fused_equals_unfused_outputs_and_gradients(kernel, mode, n_units, bias):
    fused, plain = snell_pair(kernel, mode, n_units, bias=bias)
    assert fused.uses_fused_path() and not plain.uses_fused_path()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    gy = torch.randn(2, 5, 9, dtype=torch.float64)
    outs = []
    for layer in (fused, plain):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * gy).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()
                                           if p.requires_grad}))
    (y1, gx1, g1), (y2, gx2, g2) = outs
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx1, gx2, atol=1e-12, rtol=1e-10)
    assert g1.keys() == g2.keys() and any(n.endswith("kernel.alpha") for n in g1) == (
        kernel == "mixture")
    for n in g1:
        assert g1[n] is not None and g1[n].abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g2[n], atol=1e-12, rtol=1e-10, msg=n)
    assert fused.base_layer.weight.grad is None


@pytest.mark.parametrize("kernel,learnable,segments", [
    ("piecewise", False, 2), ("piecewise", True, 4), ("mixture", False, 2), ("mixture", True, 1)])
@pytest.mark.parametrize("mode,s", [("code", 0.5), ("soft", 0.5), ("code", 0.0), ("none", 0.3),
                                    ("squared", 0.5), ("mask", 0.5), ("mask", 0.0)])
@pytest.mark.parametrize("fused,block", [(True, None), (True, 8), (False, None)])
def test_closed_form_backward_equals_autograd(monkeypatch, kernel, learnable, segments, mode, s,
                                              fused, block):
    # the hand-written kernel backward (autograd.delta_vjp) against autograd through the same
    # expression, with coinciding rows (clamped distances) in one unit; block=8: the fused
    # backward rebuilds each 6 x 4 unit update in row blocks of 2 (3 blocks per unit)
    import copy

    from trimtune.tuners.snell import autograd as snell

    if block:
        monkeypatch.setitem(snell.BACKWARD_BLOCK_ELEMENTS, "cpu", block)
        assert len(snell._row_blocks(6, 4, torch.device("cpu"))) == 3
    torch.manual_seed(3)
    units = [SparseDelta(6, 4, 4, create_kernel(kernel, segments, learnable_coeffs=learnable),
                         sparsity=s, sparsify=mode).double() for _ in range(3)]
    with torch.no_grad():
        units[0].snell_B[:2].copy_(units[0].snell_A[:2])
        for u in units:
            for p in u.kernel.parameters():
                p.add_(0.2)
    layer = SnellLinear.from_units(nn.Linear(6, 12).double(), units, fused=fused)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    gy = torch.randn(2, 3, 12, dtype=torch.float64)
    grads = []
    for m, closed in ((layer, True), (twin, False)):
        monkeypatch.setattr(snell, "closed_form_supported", lambda k, c=closed: c)
        xi = x.clone().requires_grad_(True)
        (m(xi) * gy).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in m.named_parameters()
                                       if p.requires_grad}})
    assert grads[0].keys() == grads[1].keys()
    assert any("coeffs" in n for n in grads[0]) == learnable
    for n in grads[0]:
        assert grads[0][n] is not None and torch.isfinite(grads[0][n]).all(), n
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-11, rtol=1e-9, msg=n)


def test_fused_function_passes_gradcheck():
    # "squared" (the code's forward with its true derivative): the detached threshold does not
    # enter the surviving values (in "soft" it does, so finite differences would see dt/dA,
    # which the method defines as zero); "code" detaches |dW| on purpose (the authors'), so
    # its gradient is not the forward's derivative (test_tuners_faithful checks it)
    fused, _ = snell_pair("mixture", "squared", 3, sparsities=(0.2, 0.5, 0.0))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    units = fused.snell_units["default"]
    a = units[1].snell_A.detach().clone().requires_grad_(True)

    def f(x, a):  # perturb one unit's A through the functional form of the layer
        from torch.func import functional_call
        return functional_call(fused, {"snell_units.default.1.snell_A": a}, (x,))

    assert torch.autograd.gradcheck(f, (x, a), eps=1e-6, atol=1e-6)


def test_fused_used_only_without_stochastic_branch():
    base = nn.Linear(6, 6)
    units = [SparseDelta(6, 6, 4, create_kernel("piecewise", 2))]
    assert SnellLinear.from_units(base, units).uses_fused_path()
    assert not SnellLinear.from_units(base, units, fused=False).uses_fused_path()
    drop = SnellLinear.from_units(base, units, dropout=0.1, drop_path=0.1)
    assert not drop.uses_fused_path()
    assert drop.eval().uses_fused_path()  # dropout and drop-path are identities in eval


@pytest.mark.parametrize("recompute", [True, False])
def test_fused_no_grad_and_plain_autograd_variants_agree(recompute):
    fused, plain = snell_pair("mixture", "code", 3)
    for u in fused.snell_units["default"]:
        u.recompute = recompute
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-12, rtol=1e-10)
    xi = x.clone().requires_grad_(True)
    fused(xi).sum().backward()
    xj = x.clone().requires_grad_(True)
    plain(xj).sum().backward()
    torch.testing.assert_close(xi.grad, xj.grad, atol=1e-12, rtol=1e-10)
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10, msg=n)


def saved_new_bytes(fn, module):
    """Bytes of distinct saved tensors, not counting ``module``'s frozen parameters (the base
    ``W`` is referenced by the graph, not new memory); trainable factors are counted."""
    frozen = {(p.data_ptr(), p.numel(), p.dtype) for p in module.parameters()
              if not p.requires_grad}
    seen = {}

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in frozen:
            seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def fused_layer_bytes(batch, rank, d=48, n_units=3):
    torch.manual_seed(0)
    units = [SparseDelta(d, d // n_units, rank, create_kernel("mixture", 2), sparsity=0.5)
             for _ in range(n_units)]
    layer = SnellLinear.from_units(nn.Linear(d, d), units)
    assert layer.uses_fused_path()
    x = torch.randn(batch, 3, d, requires_grad=True)
    return saved_new_bytes(lambda: layer(x), layer)


def test_fused_saved_for_backward_scales_with_batch_and_rank_not_weight():
    d = 48
    b1, b2, r8 = fused_layer_bytes(1, 4), fused_layer_bytes(2, 4), fused_layer_bytes(1, 8)
    assert b2 - b1 == 3 * d * 4  # one more sample of input activations (3 tokens x d float32)
    assert r8 - b1 == 3 * 4 * (d + d // 3) * 4  # r(m + n) more factor entries, 3 units
    assert b1 < d * d * 4  # less than one m*n tensor: neither W' nor dW is kept


@pytest.mark.parametrize("fused", [True, False])
def test_one_threshold_per_unit_per_step_and_none_at_zero_sparsity(monkeypatch, fused):
    import trimtune.tuners.snell.sparsifier as snell

    calls = []
    real = snell.magnitude_threshold
    monkeypatch.setattr(snell, "magnitude_threshold", lambda dw, s: calls.append(s) or real(dw, s))
    units = [SparseDelta(8, 4, 4, create_kernel("mixture", 2), sparsity=s)
             for s in (0.0, 0.5, 0.0)]
    layer = SnellLinear.from_units(nn.Linear(8, 12), units, fused=fused)
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert calls == [0.5]  # forward only (backward reuses it); s = 0 needs no k-th value
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
