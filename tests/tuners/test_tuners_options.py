"""SNELL / SNELLA options beyond the authors: per-parameter learning-rate multipliers of the
kernel's scalars and of ``snell_B`` (read by the training loop), and the factors' init scale.
1.0 is the authors' behaviour: the defaults add nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_vit  # noqa: E402

import trimtune as tt  # noqa: E402
from trimtune.errors import TrimtuneError  # noqa: E402
from trimtune.train.loop import _param_groups  # noqa: E402


def _units(model):
    return [m for m in model.modules() if type(m).__name__ == "SparseDelta"]


def test_defaults_give_timm_groups_and_no_scales():
    from timm.optim._param_groups import param_groups_weight_decay
    m = tiny_vit()
    tt.attach(m, tt.SnellaConfig(r=4))
    ours = _param_groups(0.05)(m)
    timm_groups = param_groups_weight_decay(m, 0.05, no_weight_decay_list=m.no_weight_decay())
    assert [[id(p) for p in g["params"]] for g in ours] == \
        [[id(p) for p in g["params"]] for g in timm_groups]
    assert not any("lr_scale" in g for g in ours)


def test_lr_scales_reach_the_optimizer_and_the_scheduler(tmp_path):
    m = tiny_vit()
    tt.attach(m, tt.SnellaConfig(r=4, kernel_lr_scale=0.01, b_lr_scale=4.0))
    groups = _param_groups(0.05)(m)
    scaled = {g.get("lr_scale", 1.0): {id(p) for p in g["params"]} for g in groups}
    for u in _units(m):
        assert id(u.snell_B) in scaled[4.0] and id(u.snell_A) in scaled[1.0]
        for p in (u.kernel.alpha, u.kernel.gamma, u.kernel.beta):
            assert id(p) in scaled[0.01]
    # in a real run: after one step each scalar moved ~100x less than without the option
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    data = torch.utils.data.TensorDataset(x, y)
    moved = {}
    for scale in (1.0, 0.01):
        model = tiny_vit()
        tt.attach(model, tt.SnellaConfig(r=4, kernel_lr_scale=scale))
        beta0 = [u.kernel.beta.item() for u in _units(model)]
        tt.train.fit(model, data, tt.train.ClassificationObjective(), tt.TrainConfig(
            epochs=1, batch_size=16, lr=1e-2, out_dir=tmp_path / f"s{scale}", progress=False))
        moved[scale] = max(abs(u.kernel.beta.item() - b) for u, b in zip(_units(model), beta0))
    assert moved[1.0] > 5e-3 and moved[0.01] < moved[1.0] / 50


def test_init_scale_scales_the_factors():
    a, b = tiny_vit(), tiny_vit()
    torch.manual_seed(3)
    tt.attach(a, tt.SnellaConfig(r=4))
    torch.manual_seed(3)
    tt.attach(b, tt.SnellaConfig(r=4, init_scale=0.25))
    for ua, ub in zip(_units(a), _units(b)):
        torch.testing.assert_close(ub.snell_A, 0.25 * ua.snell_A)
        torch.testing.assert_close(ub.snell_B, 0.25 * ua.snell_B)


def test_b_init_scale_zero_starts_snell_at_the_base_model_and_still_trains():
    torch.manual_seed(0)
    m = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
    cfg = tt.SnellConfig(r=4, kernel="inner", sparsity=0.0, b_init_scale=0.0,
                         modules_to_save=[])
    tt.attach(m, cfg)
    units = _units(m)
    assert units and all(u.snell_B.abs().max() == 0 and u.snell_A.abs().max() > 0
                         for u in units)
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)  # LoRA's start: the update is exactly zero
    m(x).square().mean().backward()
    assert all(u.snell_B.grad is not None and u.snell_B.grad.abs().max() > 0 for u in units)


@pytest.mark.parametrize("cfg", [dict(method="snella"), dict(method="snell", sparsity=0.5),
                                 dict(method="snell", sparsity=0.5, sparsify="mask")])
def test_b_init_scale_zero_with_a_competing_update_is_refused(cfg):
    # at dW = 0 nothing survives a competition (and dW |dW| has no gradient): never trains
    kind = tt.SnellaConfig if cfg.pop("method") == "snella" else tt.SnellConfig
    with pytest.raises(TrimtuneError, match="at dW = 0 no entry survives.*--sparsity 0"):
        kind(r=4, b_init_scale=0.0, **cfg)
    with pytest.raises(TrimtuneError, match="b_init_scale=-1.0: give a multiplier >= 0"):
        kind(r=4, b_init_scale=-1.0, **cfg)


@pytest.mark.parametrize("bad", [0, -1.0, "x", True])
def test_bad_multiplier_is_one_clear_error(bad):
    for name in ("kernel_lr_scale", "b_lr_scale", "init_scale"):
        with pytest.raises(TrimtuneError, match=f"{name}=.*positive multiplier"):
            tt.SnellaConfig(r=4, **{name: bad})


def test_unknown_option_name_is_one_clear_error():
    with pytest.raises(TrimtuneError, match=r"unknown snella option 'kernel_lr'.*kernel_lr_scale"):
        tt.FinetuneConfig(method="snella", method_kwargs={"kernel_lr": 0.1})


def test_cli_bad_multiplier_exits_2_and_writes_nothing(tmp_path, capsys):
    from trimtune.cli import main
    out = tmp_path / "run"
    code = main(["finetune", "--model", "vit_tiny_patch16_224", "--data", "digits:40",
                 "--out", str(out), "--kernel-lr-scale", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "kernel_lr_scale=0" in err and "positive multiplier" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_min_density_reaches_snella_only_and_a_bad_one_exits_2(tmp_path, capsys):
    import argparse

    from trimtune.cli import _snell_options, main
    a = argparse.Namespace(method="snella", kernel_lr_scale=0.01, b_lr_scale=1.0,
                           init_scale=1.0, b_init_scale=1.0, min_density=0.1, sparsify="mask")
    assert _snell_options(a)["min_density"] == 0.1 and _snell_options(a)["sparsify"] == "mask"
    assert "min_density" not in _snell_options(argparse.Namespace(**{**vars(a),
                                                                      "method": "snell"}))
    assert _snell_options(argparse.Namespace(**{**vars(a), "method": "lora"})) == {}
    out = tmp_path / "run"
    code = main(["finetune", "--model", "vit_tiny_patch16_224", "--data", "digits:40",
                 "--out", str(out), "--min-density", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "min_density=0.5 is outside [0, 0.3]" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
