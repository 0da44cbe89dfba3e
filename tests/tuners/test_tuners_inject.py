"""attach / merge / detach / trainable_summary on tiny timm ViTs and compressed models."""

import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.tuners import (
    SnellaConfig,
    SnellConfig,
    SnellLinear,
    attach,
    detach,
    iter_units,
    merge,
    trainable_summary,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_vit  # noqa: E402


def snell_layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, SnellLinear)]


def test_attach_wraps_default_targets_and_freezes(vit, images):
    attach(vit, SnellConfig(r=4, sparsity=0.5, dropout=0.1))
    assert snell_layer_names(vit) == [f"blocks.{i}.{n}" for i in range(2)
                                      for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert list(vit.peft_config) == ["default"]
    units = vit.blocks[0].attn.qkv.snell_units["default"]
    assert [u.out_features for u in units] == [64, 64, 64]  # q, k, v updates
    assert vit.blocks[0].attn.proj.snell_dropout["default"].__class__ is nn.Identity  # authors
    assert vit.blocks[0].mlp.fc1.snell_dropout["default"].__class__ is nn.Dropout
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.named_parameters()
                         if ".snell_units." in n or n.startswith("head.modules_to_save.")
                         or n == "cls_token"}
    assert len(dict(iter_units(vit))) == 2 * 6
    out = vit(images)
    out.sum().backward()
    assert all(p.grad is None for n, p in vit.named_parameters() if not p.requires_grad)


def test_merge_equals_adapted_eval_output_and_restores_plain_model(vit, images):
    ref = tiny_vit()
    attach(vit, SnellaConfig(r=4, init_sparsity=0.4))
    with torch.no_grad():  # move head and kernel scalars away from init
        for p in vit.parameters():
            if p.requires_grad and p.dim() <= 1:
                p.add_(0.1)
    vit.eval()
    y = vit(images)
    merge(vit)
    assert not any(isinstance(m, SnellLinear) for m in vit.modules())
    assert not hasattr(vit, "peft_config")
    assert type(vit) is type(ref)
    assert vit.state_dict().keys() == ref.state_dict().keys()
    assert all(p.requires_grad for p in vit.parameters())
    torch.testing.assert_close(vit(images), y, atol=1e-5, rtol=0)


def test_detach_restores_base_weights(vit, images):
    w = vit.blocks[1].mlp.fc2.weight.detach().clone()
    attach(vit, SnellConfig(r=2))
    detach(vit)
    assert isinstance(vit.blocks[1].mlp.fc2, nn.Linear)
    assert type(vit.head) is nn.Linear
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, w)
    attach(vit, SnellConfig(r=2))  # attachable again


def test_bad_attach_inputs(vit):
    with pytest.raises(TrimtuneError, match="closest module names: .*fc1"):
        attach(vit, SnellConfig(target_modules=["fc_1"]))
    with pytest.raises(TrimtuneError, match="closest module names: .*qkv"):
        attach(vit, SnellConfig(target_modules="qkv"))  # a string is a whole-name regex (PEFT)
    assert not hasattr(vit, "peft_config")  # nothing half-attached
    attach(vit, SnellConfig(r=2, target_modules=r".*mlp\.fc1"))
    assert snell_layer_names(vit) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    with pytest.raises(TrimtuneError, match="already has an adapter"):
        attach(vit, SnellConfig(r=2))
    with pytest.raises(TrimtuneError, match="nothing to merge"):
        merge(tiny_vit())


@pytest.mark.parametrize("kw,match", [
    (dict(r=5, segments=2), "not divisible"), (dict(sparsity=1.0), r"\[0, 1\)"),
    (dict(sparsity=-0.2), r"\[0, 1\)"), (dict(kernel="cosine"), "unknown kernel"),
    (dict(sparsify="hard"), "unknown sparsify"),
])
def test_bad_config(kw, match):
    with pytest.raises(TrimtuneError, match=match):
        SnellConfig(**kw)


def test_config_dict_round_trip():
    for cfg in (SnellConfig(r=16, target_modules=["qkv", "fc1"]),
                SnellaConfig(r=8, target_sparsity=0.6, schedule_unit="epoch")):
        back = SnellConfig.from_dict(cfg.to_dict())
        assert type(back) is type(cfg) and back == cfg
    assert SnellaConfig(init_sparsity=0.2).sparsity == 0.2
    with pytest.raises(TrimtuneError, match=r"\[0, 1\)"):
        SnellaConfig(target_sparsity=1.2)


class HandLowRank(nn.Module):
    """Stand-in named like trimtune.lowrank.LowRankLinear (first / second)."""

    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.first, self.second = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out)

    def forward(self, x):
        return self.second(self.first(x))


def compressed_vit():
    try:
        from trimtune.lowrank import compress
    except ImportError:
        compress = None
    model = tiny_vit()
    if compress is not None:
        return compress(model, ratio=2.0)
    for blk in model.blocks:
        blk.attn.qkv = HandLowRank(64, 192, 16)
        blk.mlp.fc1 = HandLowRank(64, 256, 16)
    return model


@pytest.mark.parametrize("method", ["snell", "snella"])
def test_compressed_model_one_update_per_factorised_layer_and_merge_exact(images, method):
    model = compressed_vit()
    dense_units = {n for n, _ in iter_units(attach(tiny_vit(), SnellConfig(r=4)))}
    cfg = (SnellConfig(r=4, sparsity=0.3) if method == "snell"
           else SnellaConfig(r=4, init_sparsity=0.3))
    attach(model, cfg)
    targets = snell_layer_names(model)
    assert "blocks.0.attn.qkv.second" in targets and "blocks.0.attn.qkv.first" not in targets
    assert not any(t.endswith(".first") for t in targets)
    assert len(model.get_submodule("blocks.0.attn.qkv.second").snell_units["default"]) == 3
    # as many units as on the dense model, each on the factor in place of the dense layer
    units = [n for n, _ in iter_units(model)]
    assert len(units) == len(dense_units)
    assert {u.replace(".second", "") for u in units} == dense_units
    with torch.no_grad():
        for _, u in iter_units(model):
            u.snell_B.normal_()  # a non-zero update
    model.eval()
    y = model(images)
    merge(model)
    assert not any(isinstance(m, SnellLinear) for m in model.modules())
    assert type(model.blocks[0].attn.qkv.second) is nn.Linear  # still factorised
    torch.testing.assert_close(model(images), y, atol=1e-5, rtol=0)


def test_compressed_model_explicit_factor_patterns(images):
    model = attach(compressed_vit(), SnellConfig(r=4, target_modules=r".*qkv\.(first|second)"))
    targets = snell_layer_names(model)
    assert targets == [f"blocks.{i}.attn.qkv.{f}" for i in range(2) for f in ("first", "second")]
    model.eval()
    with torch.no_grad():
        for _, u in iter_units(model):
            u.snell_B.normal_()
    y = model(images)
    merge(model)
    torch.testing.assert_close(model(images), y, atol=1e-5, rtol=0)


def test_vit_base_r32_adapter_count():
    """ViT-B/16, r = 32 on q, k, v, proj, fc1, fc2: the notes' 5,309,184 = A/B + cls token."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    attach(model, SnellConfig(r=32))
    s = trainable_summary(model)
    ab = sum(p.numel() for n, p in model.named_parameters()
             if n.endswith(("snell_A", "snell_B")))
    assert ab == s["adapter"] == 12 * 32 * (8 * 768 + 2 * (768 + 3072)) == 5_308_416
    assert ab + model.cls_token.numel() == 5_309_184
    assert s["kernel"] == 0 and s["other"] == 768 * 100 + 100 + 768
    assert s["trainable"] == s["adapter"] + s["kernel"] + s["other"]
    assert 0 < s["percent"] < 100


def test_default_config_is_fused_and_equals_unfused_model(images):
    """Defaults: no branch dropout / drop-path, fused path; same loss and grads as unfused."""
    cfg = SnellaConfig(r=4, init_sparsity=0.5)
    assert (cfg.dropout, cfg.drop_path, cfg.fused) == (0.0, 0.0, True)
    grads = []
    for fused in (True, False):
        model = attach(tiny_vit().double(), SnellaConfig(r=4, init_sparsity=0.5, fused=fused))
        layers = [m for m in model.modules() if isinstance(m, SnellLinear)]
        assert all(m.uses_fused_path() == fused for m in layers)
        model(images.double()).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-10, rtol=1e-8, msg=n)


def test_paper_branch_regularisation_falls_back_to_unfused(vit, images):
    attach(vit, SnellConfig(r=4, dropout=0.1, drop_path=0.1))
    layers = [m for m in vit.modules() if isinstance(m, SnellLinear)]
    assert not any(m.uses_fused_path() for m in layers)
    vit(images).sum().backward()
    assert all(m.eval().uses_fused_path() for m in layers)
