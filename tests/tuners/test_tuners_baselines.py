"""Baseline methods: trainable sets, parameter counts, one-step isolation, merge exactness."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.tuners.registry import merge
from trimtune.tuners.simple import (
    prepare_method,
    target_linears,
    trainable_parameters,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_vit  # noqa: E402

D, HID, DEPTH, NCLS = 64, 256, 2, 5  # tiny_vit(): embed 64, mlp 4x, 2 blocks, 5 classes
HEAD = D * NCLS + NCLS
# (in, out) of the four targets of one block: fused qkv, proj, fc1, fc2
SHAPES = [(D, 3 * D), (D, D), (D, HID), (HID, D)]


def one_step(model: nn.Module, images: torch.Tensor, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """One SGD step on a random-label cross-entropy; returns the parameters before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    labels = torch.arange(len(images)) % NCLS
    nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    opt.zero_grad()
    return before


def randomise_adapters(model: nn.Module) -> None:
    """PEFT zero-inits lora_B (AdaLoRA: lora_E); make the update non-zero for merge tests."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method, expected", [
    ("full", lambda n: True),
    ("linear", lambda n: n.startswith("head.")),
    ("bitfit", lambda n: n.endswith("bias") or n.startswith("head.")),
    ("lora", lambda n: "lora_A" in n or "lora_B" in n or n.startswith("head.")),
    ("dora", lambda n: "lora_" in n or n.startswith("head.")),
    ("adalora", lambda n: "lora_A" in n or "lora_B" in n or "lora_E" in n
     or n.startswith("head.")),
    ("masked-sparse", lambda n: n.startswith("head.") or (
        n.endswith("weight") and any(f".{t}." in n + "." for t in ("qkv", "proj", "fc1", "fc2"))
        and "patch_embed" not in n)),
])
def test_trainable_names(method, expected):
    model, _ = prepare_method(tiny_vit(), method, rank=4)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if expected(n)}
    assert type(model).__name__ == "VisionTransformer"  # never wrapped


def test_trainable_counts_match_formulas():
    r = 4
    full = sum(p.numel() for p in tiny_vit().parameters())
    counts = {m: trainable_parameters(prepare_method(tiny_vit(), m, rank=r)[0])
              for m in ("full", "linear", "lora", "dora", "adalora", "masked-sparse")}
    assert counts["full"] == full
    assert counts["linear"] == HEAD
    # fused qkv stays fused: r * (d + 3d) there
    lora = DEPTH * sum(r * (i + o) for i, o in SHAPES)
    assert counts["lora"] == lora + HEAD
    assert counts["dora"] == lora + DEPTH * sum(o for _, o in SHAPES) + HEAD
    init_r = 6  # ceil(1.5 * r)
    assert counts["adalora"] == DEPTH * sum(init_r * (i + o + 1) for i, o in SHAPES) + HEAD
    # masked-sparse keeps the whole matrices in the optimizer (the SPT/GPS memory reference)
    assert counts["masked-sparse"] == DEPTH * sum(i * o for i, o in SHAPES) + HEAD
    bitfit = sum(p.numel() for n, p in tiny_vit().named_parameters()
                 if n.endswith("bias") and not n.startswith("head."))
    assert trainable_parameters(prepare_method(tiny_vit(), "bitfit")[0]) == bitfit + HEAD


@pytest.mark.parametrize("method", ["linear", "bitfit", "lora", "dora", "adalora"])
def test_one_step_changes_only_trainable(method, images):
    model, _ = prepare_method(tiny_vit(), method, rank=4)
    before = one_step(model, images)
    changed = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            changed |= {n} if not torch.equal(p, before[n]) else set()
        else:
            assert torch.equal(p, before[n]), f"frozen {n} moved"
    assert any(n.startswith("head.") for n in changed)
    if method != "linear":
        assert any(not n.startswith("head.") for n in changed)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_merge_equals_unmerged(method, images):
    model, _ = prepare_method(tiny_vit(), method, rank=4)
    randomise_adapters(model)
    one_step(model, images)
    model.eval()
    with torch.no_grad():
        ref = model(images)
    merged = merge(model)
    with torch.no_grad():
        out = merged(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    plain = tiny_vit()
    assert merged.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(merged.state_dict())  # a stock timm model takes the weights
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), ref, atol=1e-5, rtol=1e-5)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in target_linears(merged))


@pytest.mark.parametrize("kw", [dict(density=0.25), dict(sparsity=0.9, mask_init="random"),
                                "batches"])
def test_masked_sparse_updates_only_masked_entries(kw, images):
    if kw == "batches":
        kw = dict(density=0.2, batches=[(images, torch.arange(4) % NCLS)])
    density = kw.get("density", 1 - kw.get("sparsity", 0.7))
    model, _ = prepare_method(tiny_vit(), "masked-sparse", **kw)
    before = one_step(model, images)
    for name in target_linears(model):
        layer = model.get_submodule(name)
        mask = layer.trimtune_grad_mask
        assert int(mask.sum()) == round(density * mask.numel())
        moved = layer.weight.detach() != before[f"{name}.weight"]
        assert not (moved & (mask == 0)).any(), f"{name}: an unmasked entry moved"
        assert moved.any()
        assert torch.equal(layer.bias, before[f"{name}.bias"])
    merge(model)
    assert not any(hasattr(m, "trimtune_grad_mask") for m in model.modules())


def test_masked_sparse_gradient_mask_follows_gradient(images):
    labels = torch.arange(4) % NCLS
    model, _ = prepare_method(tiny_vit(), "masked-sparse", density=0.1, batches=[(images, labels)])
    ref = tiny_vit()
    nn.functional.cross_entropy(ref(images), labels).backward()
    g = ref.get_submodule("blocks.1.mlp.fc2").weight.grad.abs()
    mask = model.get_submodule("blocks.1.mlp.fc2").trimtune_grad_mask.bool()
    assert g[mask].min() >= g[~mask].max()


class Factorised(nn.Module):
    """Stand-in for trimtune.lowrank.LowRankLinear (first: in->r, second: r->out)."""

    def __init__(self, linear: nn.Linear, r: int) -> None:
        super().__init__()
        self.first = nn.Linear(linear.in_features, r, bias=False)
        self.second = nn.Linear(r, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_lora_on_compressed_factors(images):
    model = tiny_vit()
    for blk in model.blocks:
        blk.mlp.fc1 = Factorised(blk.mlp.fc1, 16)
    targets = target_linears(model)
    # the one rule: a matched factorised layer gets one update, on .second (as SNELL)
    assert "blocks.0.mlp.fc1.second" in targets and "blocks.0.mlp.fc1.first" not in targets
    r = 4
    model, _ = prepare_method(model, "lora", rank=r)
    shapes = [(D, 3 * D), (D, D), (16, HID), (HID, D)]
    assert trainable_parameters(model) == DEPTH * sum(r * (i + o) for i, o in shapes) + HEAD
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        ref = model(images)
        out = merge(model)(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert type(model.blocks[0].mlp.fc1.first) is nn.Linear


def test_adalora_callback_allocates_and_resumes(images):
    model, (cb,) = prepare_method(tiny_vit(), "adalora", rank=2, init_r=4, tinit=1, tfinal=1)
    st = SimpleNamespace(model=model, step=0, total_steps=5)
    cb.on_train_start(st)
    assert cb.config.total_step == 5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.arange(4) % NCLS
    for step in range(1, 4):
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        st.step = step
        cb.after_optimizer_step(st)
        opt.zero_grad()
    assert cb.config.rank_pattern  # ranks were allocated
    kept = sum(sum(v) for v in cb.config.rank_pattern.values())
    assert kept < 4 * 4 * DEPTH  # some triplets were pruned
    sd = cb.state_dict()
    model2, (cb2,) = prepare_method(tiny_vit(), "adalora", rank=2, init_r=4, tinit=1, tfinal=1)
    cb2.load_state_dict(sd)
    assert cb2.config.total_step == 5 and cb2.config.rank_pattern == cb.config.rank_pattern


def test_bad_inputs():
    with pytest.raises(TrimtuneError, match="unknown method"):
        prepare_method(tiny_vit(), "prefix")
    with pytest.raises(TrimtuneError, match="does not take"):
        prepare_method(tiny_vit(), "lora", density=0.3)
    with pytest.raises(TrimtuneError, match="closest module names"):
        prepare_method(tiny_vit(), "lora", target_modules=["nope"])
    with pytest.raises(TrimtuneError, match="modules_to_save"):
        prepare_method(tiny_vit(), "linear", modules_to_save=("classifier",))
    with pytest.raises(TrimtuneError, match="density"):
        prepare_method(tiny_vit(), "masked-sparse", density=0.0)
    with pytest.raises(TrimtuneError, match="batches"):
        prepare_method(tiny_vit(), "masked-sparse", mask_init="gradient")
    _, (cb,) = prepare_method(tiny_vit(), "adalora")
    with pytest.raises(TrimtuneError, match="training steps"):
        cb.on_train_start(SimpleNamespace(total_steps=None))
    with pytest.raises(TrimtuneError, match="nothing to merge"):
        merge(tiny_vit())


def test_adalora_in_fit_loop(tmp_path):
    """AdaLoRA's callback gets total_step from fit() and prunes ranks by the end."""
    from trimtune.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=g),
                                          torch.arange(8) % NCLS)
    model, callbacks = prepare_method(tiny_vit(), "adalora", rank=2, init_r=4, tfinal=1)

    def objective(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), {}

    fit(model, data, objective, TrainConfig(epochs=2, batch_size=4, lr=1e-2, out_dir=tmp_path,
                                            progress=False), callbacks=callbacks)
    cfg = callbacks[0].config
    assert cfg.total_step == 4
    kept = sum(sum(v) for v in cfg.rank_pattern.values())
    assert kept == 2 * 4 * DEPTH  # AdaLoRA's final budget: target_r per adapted matrix
