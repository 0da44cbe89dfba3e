"""SNELL / SNELLA behave as the authors' code (github ssfgunner/SNELL), forward and backward.

Each test writes the authors' expression out explicitly (from model/vision_transformer_timm.py:
``SNELL.sparsify``, ``SNELLA.sparsify``, ``KLoRA``, ``TuningModule``; train_alloc.py's
allocation timing) and compares trimtune against it on the same tensors.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trimtune.tuners import SnellaAllocator, SnellaConfig, SnellConfig, attach, iter_units
from trimtune.tuners.snell.kernels import create_kernel
from trimtune.tuners.snell.delta import SparseDelta
from trimtune.tuners.snell.sparsifier import num_zeroed
from trimtune.tuners.snell.layer import SnellLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_vit  # noqa: E402


def authors_sparsify(weight: torch.Tensor, s: float) -> torch.Tensor:
    """``SNELLA.sparsify`` with trimtune's exact k-th value in place of ``torch.quantile``
    (the notes: quantile zeroes one entry more; the form of the product is the point here)."""
    weight_abs = weight.detach().abs()
    k = num_zeroed(s, weight.numel())
    thres = weight_abs.flatten().kthvalue(k).values if k else weight_abs.new_zeros(())
    n_sub = F.threshold(weight_abs, float(thres), 0)
    return weight * n_sub


@pytest.mark.parametrize("kernel", ["piecewise", "mixture"])
@pytest.mark.parametrize("s", [0.0, 0.5])
@pytest.mark.parametrize("path", ["fused", "branch", "autograd"])
def test_code_sparsifier_gradient_is_the_authors(kernel, s, path):
    """'code': the gradient w.r.t. the factors is the authors' (|dW| on the survivors, the
    magnitude factor detached), not the true derivative of dW |dW| (2 |dW|)."""
    torch.manual_seed(0)
    unit = SparseDelta(12, 9, 4, create_kernel(kernel, 2), sparsity=s, sparsify="code",
                       recompute=path != "autograd").double()
    ref = copy.deepcopy(unit)
    layer = SnellLinear.from_units(nn.Linear(12, 9).double(), [unit], fused=path == "fused")
    x = torch.randn(5, 12, dtype=torch.float64)
    gy = torch.randn(5, 9, dtype=torch.float64)
    (layer(x) * gy).sum().backward()

    dw = ref.kernel(ref.snell_A, ref.snell_B)
    y_ref = layer.base_layer(x) + x @ authors_sparsify(dw, s)
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(layer(x), y_ref, atol=1e-12, rtol=1e-10)
    for (n, p), q in zip(unit.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10, msg=n)


def test_squared_mode_is_the_true_derivative_twice_code():
    """'squared' keeps the same forward with the full derivative: on the factors of a
    piecewise kernel it is exactly 2x 'code' (the kernel is linear in dW's gradient)."""
    grads = {}
    for mode in ("code", "squared"):
        torch.manual_seed(0)
        u = SparseDelta(8, 6, 4, create_kernel("piecewise", 2), sparsity=0.3, sparsify=mode)
        x = torch.randn(3, 8)
        u(x).sum().backward()
        grads[mode] = (u.snell_A.grad, u.snell_B.grad)
    for g_code, g_sq in zip(*grads.values()):
        torch.testing.assert_close(g_sq, 2 * g_code)


def test_snell_at_sparsity_zero_is_the_plain_kernel_update(vit):
    """The authors' SNELL at sparsity 0 is ``KLoRA``: ``x @ dW`` (no squaring); SNELLA squares
    at every sparsity (their SNELLA class)."""
    model = attach(copy.deepcopy(vit), SnellConfig(r=4, sparsity=0.0))
    units = dict(iter_units(model))
    assert {u.sparsify_mode for u in units.values()} == {"none"}
    u = next(iter(units.values()))
    with torch.no_grad():
        torch.testing.assert_close(u.delta(), u.kernel(u.snell_A, u.snell_B))
    model = attach(copy.deepcopy(vit), SnellConfig(r=4, sparsity=0.5))
    assert {u.sparsify_mode for _, u in iter_units(model)} == {"code"}
    model = attach(copy.deepcopy(vit), SnellaConfig(r=4, init_sparsity=0.0))
    u = next(u for _, u in iter_units(model))
    assert u.sparsify_mode == "code"
    with torch.no_grad():
        dw = u.kernel(u.snell_A, u.snell_B)
        torch.testing.assert_close(u.delta(), dw * dw.abs())


def test_qkv_units_draw_independent_drop_path_masks():
    """A split qkv's q, k and v updates each have their own DropPath (the authors' three
    TuningModules), so a sample can keep q's update and lose k's."""
    torch.manual_seed(0)
    units = [SparseDelta(8, 8, 4, create_kernel("piecewise", 2)) for _ in range(3)]
    layer = SnellLinear.from_units(nn.Linear(8, 24), units, drop_path=0.5).train()
    x = torch.randn(256, 1, 8)
    with torch.no_grad():
        branch = (layer(x) - layer.base_layer(x)).reshape(256, 3, 8)
    kept = branch.abs().sum(-1) > 0  # (samples, unit)
    assert 0.3 < kept.float().mean() < 0.7
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[:, 1] != kept[:, 2]).any()


@pytest.mark.slow
def test_snella_last_training_forward_masks_are_the_saved_ones(tmp_path):
    """No reallocation after the last optimizer step: the sparsities used by the last training
    forward are those of the returned (evaluated, saved) model, for both schedule units; with
    an epoch schedule each epoch-end evaluation sees the masks that epoch trained with."""
    from trimtune.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32, generator=g),
                                          torch.arange(16) % 5)

    def objective(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y), {}

    for unit in ("step", "epoch"):
        conf = SnellaConfig(r=4, init_sparsity=0.1, target_sparsity=0.6, schedule_unit=unit)
        model = attach(tiny_vit(), conf)
        seen: list[dict[str, float]] = []

        def record(mod, args, seen=seen, model=model):
            if mod.training:
                seen.append({n: u.sparsity for n, u in iter_units(model)})

        layer = next(m for m in model.modules() if isinstance(m, SnellLinear))
        layer.register_forward_pre_hook(record)
        evals: list[tuple[dict, dict]] = []

        def eval_fn(m, evals=evals, seen=seen):
            evals.append((dict(seen[-1]), {n: u.sparsity for n, u in iter_units(m)}))
            return {}

        alloc = SnellaAllocator(config=conf)
        fit(model, data, objective, TrainConfig(epochs=3, batch_size=4, lr=1e-2,
                                                out_dir=tmp_path / unit, progress=False,
                                                resume=False),
            callbacks=[alloc], eval_fn=eval_fn)
        final = {n: u.sparsity for n, u in iter_units(model)}
        assert seen[-1] == final, unit
        assert len(evals) == 3 and all(a == b for a, b in evals), unit
        assert len({tuple(s.values()) for s in seen}) > 1, unit  # the allocator did move
        # the history ends with the allocation in force, applied before the step that used it
        assert alloc.history[-1][1] == final
