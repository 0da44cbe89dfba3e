"""The compiled SNELL path (trimtune.tuners.snell.compiled) and the sampled exact threshold.

The fused point-wise formulation is traced by TorchDynamo with the ``eager`` backend here
(the same graph Inductor would compile, without the C++ build: seconds, not minutes); one test
builds it with Inductor on a small unit.
"""

import copy

import pytest
import torch
from torch import nn

from trimtune.tuners.snell import autograd, compiled, sparsifier
from trimtune.tuners.snell.kernels import create_kernel
from trimtune.tuners.snell.delta import SparseDelta
from trimtune.tuners.snell.sparsifier import kth_smallest
from trimtune.tuners.snell.layer import SnellLinear


@pytest.fixture
def traced(monkeypatch):
    """Every closed-form unit on the compiled path, traced with the eager backend."""
    monkeypatch.setenv("TRIMTUNE_COMPILE", "1")
    compiled.set_backend("eager")
    yield
    compiled.set_backend("inductor")


def grads_of(layer, x, gy):
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    (y * gy).sum().backward()
    return {"y": y.detach(), "x": xi.grad,
            **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}


def qkv_layer(kernel, learnable, segments, mode, s, dtype=torch.float64, d=6, n_units=3):
    torch.manual_seed(3)
    units = [SparseDelta(d, 4, 4, create_kernel(kernel, segments, learnable_coeffs=learnable),
                         sparsity=s, sparsify=mode).to(dtype) for _ in range(n_units)]
    with torch.no_grad():
        units[0].snell_B[:2].copy_(units[0].snell_A[:2])  # zero distances: clamped gradient
        for u in units:
            for p in u.kernel.parameters():
                p.add_(0.2)
    return SnellLinear.from_units(nn.Linear(d, 4 * n_units).to(dtype), units)


@pytest.mark.parametrize("kernel,learnable,segments", [
    ("piecewise", False, 2), ("piecewise", True, 4), ("mixture", False, 2), ("mixture", True, 1)])
@pytest.mark.parametrize("mode,s", [("code", 0.5), ("soft", 0.5), ("code", 0.0), ("none", 0.3),
                                    ("squared", 0.5), ("mask", 0.5), ("mask", 0.0)])
@pytest.mark.parametrize("block", [None, 8])
def test_compiled_path_equals_eager_closed_form(traced, monkeypatch, kernel, learnable, segments,
                                                mode, s, block):
    # outputs and every gradient of the fused layer, compiled vs the eager closed form (itself
    # tested against autograd and the authors' expressions), float64; block=8: 3 row blocks
    if block:
        monkeypatch.setitem(autograd.BACKWARD_BLOCK_ELEMENTS, "cpu", block)
    layer = qkv_layer(kernel, learnable, segments, mode, s)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    gy = torch.randn(2, 3, 12, dtype=torch.float64)
    calls = []
    real = compiled.call
    monkeypatch.setattr(compiled, "call", lambda name, *a: calls.append(name) or real(name, *a))
    got = grads_of(layer, x, gy)
    assert calls.count("dense") == 3 and calls.count("vjp") == 3 * (3 if block else 1)
    monkeypatch.setenv("TRIMTUNE_COMPILE", "0")
    want = grads_of(twin, x, gy)
    assert len(calls) == 3 + 3 + 3 * (3 if block else 1)  # nothing compiled for the twin
    assert got.keys() == want.keys()
    for n in want:
        assert torch.isfinite(got[n]).all(), n
        torch.testing.assert_close(got[n], want[n], atol=1e-11, rtol=1e-9, msg=n)


def test_compiled_frozen_factors_only_input_gradient(traced):
    layer = qkv_layer("mixture", False, 2, "code", 0.5)
    twin = copy.deepcopy(layer)
    for m in (layer, twin):
        for p in m.parameters():
            p.requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64)
    gy = torch.randn(4, 12, dtype=torch.float64)
    got = grads_of(layer, x, gy)
    import os
    os.environ["TRIMTUNE_COMPILE"] = "0"
    want = grads_of(twin, x, gy)
    torch.testing.assert_close(got["x"], want["x"], atol=1e-12, rtol=1e-10)


def test_allocator_changing_sparsity_does_not_recompile(monkeypatch):
    # threshold and mode enter the compiled graphs as tensors: after the first step, changing
    # a unit's sparsity (the SNELLA allocator), to 0 included, compiles nothing new
    monkeypatch.setenv("TRIMTUNE_COMPILE", "1")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled.set_backend(counting)
    try:
        torch._dynamo.reset()
        layer = qkv_layer("mixture", False, 2, "code", 0.5, dtype=torch.float32, d=40)
        x = torch.randn(5, 40)
        layer(x.requires_grad_(True)).sum().backward()
        first = len(graphs)
        assert first >= 2  # dense, merge, vjp (dynamic shapes: one graph each)
        for s in (0.3, 0.9, 0.0, 0.7):
            for u in layer.snell_units["default"]:
                u.sparsity = s
            layer(x).sum().backward()
        assert len(graphs) == first
    finally:
        compiled.set_backend("inductor")


def test_small_units_stay_eager_under_auto(monkeypatch):
    monkeypatch.delenv("TRIMTUNE_COMPILE", raising=False)
    cpu = torch.device("cpu")
    assert compiled.setting() == "auto"  # the default
    assert compiled.use_compiled(cpu, 1 << 24)
    monkeypatch.setenv("TRIMTUNE_COMPILE", "auto")
    assert not compiled.use_compiled(cpu, compiled.MIN_NUMEL - 1)
    assert compiled.use_compiled(cpu, compiled.MIN_NUMEL)
    assert not compiled.use_compiled(torch.device("cuda"), 1 << 24)  # auto: CPU only
    monkeypatch.setenv("TRIMTUNE_COMPILE", "0")
    assert not compiled.use_compiled(cpu, 1 << 24)
    monkeypatch.setenv("TRIMTUNE_COMPILE", "1")
    assert compiled.use_compiled(cpu, 4)


def test_unknown_compile_setting_warns_once_and_means_auto(monkeypatch):
    monkeypatch.setattr(compiled, "_state", {**compiled._state, "warned": set()})
    monkeypatch.setenv("TRIMTUNE_COMPILE", "yes please")
    with pytest.warns(UserWarning, match="TRIMTUNE_COMPILE='yes please'.*using auto"):
        assert compiled.setting() == "auto"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read is silent
        assert compiled.setting() == "auto"
        monkeypatch.setenv("TRIMTUNE_COMPILE", " OFF ")
        assert compiled.setting() == "off"


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("TRIMTUNE_COMPILE", "1")

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler")

    compiled.set_backend(broken)
    try:
        torch._dynamo.reset()
        layer = qkv_layer("mixture", False, 2, "code", 0.5)
        twin = copy.deepcopy(layer)
        x = torch.randn(4, 6, dtype=torch.float64)
        gy = torch.randn(4, 12, dtype=torch.float64)
        with pytest.warns(UserWarning, match="using the eager path"):
            got = grads_of(layer, x, gy)
        assert not compiled.use_compiled(torch.device("cpu"), 1 << 20)
        monkeypatch.setenv("TRIMTUNE_COMPILE", "0")
        want = grads_of(twin, x, gy)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-11, rtol=1e-9, msg=n)
    finally:
        compiled.set_backend("inductor")


def test_inductor_build_matches_eager(monkeypatch):
    # the real C++ build once, float32, one mixture unit of 300 x 256 (above MIN_NUMEL: "auto"
    # compiles it): same output and gradients as the eager closed form
    monkeypatch.setenv("TRIMTUNE_COMPILE", "auto")
    torch._dynamo.reset()
    torch.manual_seed(0)
    unit = SparseDelta(256, 300, 8, create_kernel("mixture", 2), sparsity=0.6)
    layer = SnellLinear.from_units(nn.Linear(256, 300), [unit])
    twin = copy.deepcopy(layer)
    x = torch.randn(7, 256)
    gy = torch.randn(7, 300)
    calls = []
    real = compiled.call
    monkeypatch.setattr(compiled, "call", lambda name, *a: calls.append(name) or real(name, *a))
    got = grads_of(layer, x, gy)
    assert "vjp" in calls and not compiled._state["failed"]
    monkeypatch.setenv("TRIMTUNE_COMPILE", "0")
    want = grads_of(twin, x, gy)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-3, msg=n)


# ----------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("n", [1, 7, 1000, 70_000])
def test_sampled_kth_equals_kthvalue_ties_included(n):
    g = torch.Generator().manual_seed(n)
    for v in (torch.randn(n, generator=g), torch.randint(0, 3, (n,), generator=g).float(),
              torch.randn(n, generator=g).abs().round(decimals=2)):
        for k in sorted({1, max(1, n // 3), max(1, n // 2), (7 * n) // 10 or 1, n}):
            want = v.kthvalue(k).values
            assert kth_smallest(v, k, "sample") == want, (n, k)
            if n >= sparsifier.SAMPLE_MIN_NUMEL:
                assert kth_smallest(v, k, "auto") == want  # CPU, large: the sampled path


def test_sampled_kth_falls_back_when_the_bracket_misses(monkeypatch):
    # a sample that misrepresents the data (every sampled entry huge): still exact
    monkeypatch.setattr(sparsifier, "_SAMPLES", 10)
    v = torch.zeros(1000)
    v[::100] = 1e6 + torch.arange(10.0)
    v[1] = float("nan")
    for k in (1, 500, 990):
        assert kth_smallest(v, k, "sample") == v.kthvalue(k).values
