"""End-to-end tests of ``trimtune.tasks`` / ``trimtune.runs``: every fine-tuning method on a
tiny ViT and synthetic data, merge == unmerged, resume == uninterrupted, the run folder,
load_model(run).

Shapes: tiny ViT, D = 64, 2 blocks, MLP 4D, patch 8 on 32 px images, 4 classes.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trimtune as tt
from trimtune.checkpoint import read_json, read_safetensors
from trimtune.data import build_transform, load_dataset
from trimtune.runs import load_model, merge, save_model
from trimtune.tasks import FinetuneConfig, finetune
from trimtune.tuners import iter_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402

NUM_CLASSES = 4
DATA = "synthetic:classes=4,n=32,size=32"
TEST = DATA + "@test"
METHODS = ("snella", "snell", "lora", "dora", "adalora", "full", "linear", "bitfit",
           "masked-sparse")
RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone(seed: int = 0) -> nn.Module:
    """A random-init 2-block ViT, built by name (so it carries ``trimtune_arch``)."""
    return conftest.tiny_backbone(NUM_CLASSES, seed=seed)


def config(method: str, out: Path, *, epochs: int = 3, max_steps: int | None = None,
           resume: bool | str = False, lr: float = 3e-3, **kw) -> FinetuneConfig:
    """4 x 8 images per step; ``weight_decay=0`` so frozen / masked-out entries stay exact."""
    train = tt.TrainConfig(epochs=epochs, batch_size=8, lr=lr, min_lr=1e-5, weight_decay=0.0,
                           out_dir=out, progress=False, resume=resume, max_steps=max_steps)
    return FinetuneConfig(method=method, rank=RANK, train=train, **kw)


def batch(model: nn.Module, spec: str = TEST) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 3, 32, 32) and labels (N,) of a synthetic split, eval transform."""
    name, _, split = spec.partition("@")
    ds = load_dataset(name, split or "train", transform=build_transform(model, train=False))
    x, y = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(x), torch.tensor(y)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


@torch.no_grad()
def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits(model, x), y))


def canonical(name: str) -> str:
    """The original model's name of a (PEFT / SNELL wrapped) state-dict key (the trained copy
    of a module to save stands for the module; its frozen original is not compared)."""
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(
        ".original_module.", ".original_module(frozen).")


# ----------------------------------------------------------------------------- counts


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The targets every method adapts: qkv, attn.proj, mlp.fc1, mlp.fc2 of each block."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("blocks.")}


def expected_trainable(method: str, model: nn.Module) -> int:
    """Trainable-parameter count from the shapes of the original model, per method."""
    head = sum(p.numel() for p in model.head.parameters())
    lins = block_linears(model)
    assert len(lins) == 4 * len(model.blocks)
    r = RANK
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    if method == "linear":
        return head
    if method == "bitfit":
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")) \
            + model.head.weight.numel()
    if method == "lora":
        return sum(r * (m.in_features + m.out_features) for m in lins.values()) + head
    if method == "dora":  # + one magnitude per output unit
        return sum(r * (m.in_features + m.out_features) + m.out_features
                   for m in lins.values()) + head
    if method == "adalora":  # init_r = ceil(1.5 r): A (R, in), B (out, R), E (R, 1)
        big = math.ceil(1.5 * r)
        return sum(big * (m.in_features + m.out_features) + big for m in lins.values()) + head
    if method == "masked-sparse":  # whole target weights sit in the optimizer
        return sum(m.weight.numel() for m in lins.values()) + head
    # snell / snella: qkv is split into 3 units (in -> out / 3); A (in, r), B (out, r) per unit
    units = []
    for n, m in lins.items():
        k = 3 if n.endswith(".qkv") else 1
        units += [(m.in_features, m.out_features // k)] * k
    count = sum(r * (i + o) for i, o in units) + head + model.cls_token.numel()
    if method == "snella":  # mixture kernel: alpha, gamma, beta per unit
        count += 3 * len(units)
    return count


def intended(method: str, name: str) -> bool:
    """Whether an original parameter is meant to change under ``method``."""
    if name.startswith("head."):
        return True
    if method == "full":
        return True
    if method == "bitfit":
        return name.endswith("bias")
    if method in ("snell", "snella"):
        return name == "cls_token"
    if method == "masked-sparse":
        return name.startswith("blocks.") and name.endswith(".weight") and any(
            t in name for t in (".qkv.", ".proj.", ".fc1.", ".fc2."))
    return False


# ----------------------------------------------------------------------------- 1. methods


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_parameters(method, tmp_path):
    model = tiny_backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters()}
    want = expected_trainable(method, model)
    x, y = batch(model, DATA)
    loss0 = loss_on(model, x, y)

    r = finetune(model, DATA, config(method, tmp_path / method))
    tuned = r.model
    got = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert got == want, f"{method}: {got} trainable parameters, formula says {want}"
    assert loss_on(tuned, x, y) < loss0 - 0.05

    after = {canonical(k): v for k, v in tuned.state_dict().items()}
    missing = set(before) - set(after)
    assert not missing, f"original tensors lost: {sorted(missing)[:5]}"
    for k, v in before.items():
        if k in params and intended(method, k):
            continue
        assert torch.equal(after[k], v), f"{method} changed frozen {k}"
    assert not torch.equal(after["head.weight"], before["head.weight"])
    if method == "full":
        assert not torch.equal(after["blocks.0.attn.qkv.weight"],
                               before["blocks.0.attn.qkv.weight"])
    if method in ("snell", "snella"):
        assert not torch.equal(after["cls_token"], before["cls_token"])
    if method == "masked-sparse":  # only the entries under the mask moved; density 0.3
        for name, layer in block_linears(tuned).items():
            mask = layer.trimtune_grad_mask
            assert int(mask.sum()) == round(0.3 * mask.numel())
            moved = after[f"{name}.weight"] != before[f"{name}.weight"]
            assert moved.any() and not moved[mask == 0].any(), name


# ----------------------------------------------------------------------------- 2. merge


@pytest.fixture(scope="module")
def snella_run(tmp_path_factory):
    """One SNELLA run (sparsity 0.5 at the end) with test data: reused by several tests."""
    out = tmp_path_factory.mktemp("runs") / "snella"
    model = tiny_backbone()
    r = finetune(model, DATA, config("snella", out, sparsity=0.5), test_data=TEST)
    return r


def assert_merge_exact(model: nn.Module) -> nn.Module:
    x, y = batch(model)
    ref = logits(model, x)
    acc = tt.evaluate_model(model, load_dataset("synthetic:classes=4,n=32,size=32", "test",
                            transform=build_transform(model)), progress=False).top1
    merged = merge(copy.deepcopy(model))
    assert not hasattr(merged, "trimtune_adapter") and not hasattr(merged, "trimtune_method")
    names = [n for n, _ in merged.named_parameters()]
    assert not any(t in n for n in names for t in ("snell_", "lora_", ".base_layer."))
    out = logits(merged, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    acc_m = tt.evaluate_model(merged, load_dataset("synthetic:classes=4,n=32,size=32", "test",
                              transform=build_transform(merged)), progress=False).top1
    assert acc_m == acc
    return merged


def test_merge_equals_unmerged_snella(snella_run):
    units = [u for _, u in iter_units(snella_run.model)]
    zeroed = sum(u.sparsity * u.numel_update for u in units)
    assert zeroed / sum(u.numel_update for u in units) == pytest.approx(0.5, abs=0.01)
    assert_merge_exact(snella_run.model)


def test_merge_equals_unmerged_lora(tmp_path):
    r = finetune(tiny_backbone(), DATA, config("lora", tmp_path / "lora", epochs=1))
    merged = assert_merge_exact(r.model)
    n_plain = sum(p.numel() for p in tiny_backbone().parameters())
    assert sum(p.numel() for p in merged.parameters()) == n_plain


def test_compress_then_snella_merge_and_reload(tmp_path):
    student = tt.compress(tiny_backbone(), ratio=2.0)
    assert tt.is_compressed(student)
    r = finetune(student, DATA, config("snella", tmp_path / "run", epochs=1, sparsity=0.5))
    merged = assert_merge_exact(r.model)
    assert tt.is_compressed(merged)
    save_model(merged, tmp_path / "merged")
    back = load_model(str(tmp_path / "merged"))
    x, _ = batch(merged)
    torch.testing.assert_close(logits(back, x), logits(merged, x), atol=1e-6, rtol=0)
    # the run folder rebuilds the tuned compressed model too
    torch.manual_seed(123)
    again = load_model(str(tmp_path / "run"))
    torch.testing.assert_close(logits(again, x), logits(r.model, x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 3. resume


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["snella", "lora"])
def test_stopped_run_resumes_to_uninterrupted_weights(method, tmp_path):
    kw = dict(sparsity=0.5) if method == "snella" else {}
    full = finetune(tiny_backbone(), DATA, config(method, tmp_path / "full", epochs=2, **kw))
    part = finetune(tiny_backbone(), DATA,
                    config(method, tmp_path / "cut", epochs=2, max_steps=3, **kw))
    assert part.history[-1]["step"] == 3
    cut = finetune(tiny_backbone(), DATA, config(method, tmp_path / "cut", epochs=2,
                                                 resume=True, **kw))
    assert cut.history[0]["step"] > 3  # it continued, did not restart
    a, b = trainable_state(full.model), trainable_state(cut.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    if method == "snella":  # the allocator's schedule and state came back too
        sa = {n: u.sparsity for n, u in iter_units(full.model)}
        sb = {n: u.sparsity for n, u in iter_units(cut.model)}
        assert sa == sb and max(sa.values()) > 0


# ----------------------------------------------------------------------------- 5. run folder


def test_run_folder_and_load_model(snella_run):
    out = snella_run.out_dir
    for f in ("run.json", "metrics.jsonl", "results.json", "curves.png", "sparsity.png",
              "confusion.png", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    run = read_json(out / "run.json")
    assert run["kind"] == "finetune" and run["config"]["method"] == "snella"
    res = read_json(out / "results.json")
    assert res["test_top1"] == snella_run.test["top1"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines)
    adapter = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    assert any("snell_A" in k for k in adapter) and "head.weight" in str(list(adapter))

    torch.manual_seed(123)  # a rebuilt base must not depend on the global RNG
    back = load_model(str(out))
    x, _ = batch(back)
    torch.testing.assert_close(logits(back, x), logits(snella_run.model, x), atol=1e-6, rtol=0)


def test_run_folder_baseline_and_no_test_data(tmp_path):
    r = finetune(tiny_backbone(), DATA, config("lora", tmp_path / "lora", epochs=1))
    out = r.out_dir
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "confusion.png").exists() and not (out / "sparsity.png").exists()
    assert read_json(out / "results.json")["test"] is None
    torch.manual_seed(123)  # a rebuilt base must not depend on the global RNG
    back = load_model(str(out))
    x, _ = batch(back)
    torch.testing.assert_close(logits(back, x), logits(r.model, x), atol=1e-6, rtol=0)


def test_new_head_for_other_class_count(tmp_path):
    model = conftest.tiny_backbone(7)
    r = finetune(model, DATA, config("linear", tmp_path / "run", epochs=1))
    assert r.model.num_classes == NUM_CLASSES
    torch.manual_seed(123)
    back = load_model(str(tmp_path / "run"))
    x, _ = batch(back)
    torch.testing.assert_close(logits(back, x), logits(r.model, x), atol=1e-6, rtol=0)


def test_load_model_rejects_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(tt.TrimtuneError, match="trimtune.json"):
        load_model(str(tmp_path))


def test_selection_on_validation_restores_the_best_epoch(tmp_path):
    """With eval_data the returned model is the best validation epoch (weights AND the SNELLA
    per-unit sparsities the allocator had then), never chosen on the test set."""
    val = DATA + "@val"
    cfg = config("snella", tmp_path / "sel", epochs=4)
    cfg.train.lr = 0.05  # large steps so the epochs differ
    run = finetune(tiny_backbone(), DATA, cfg, eval_data=val)
    rows = [r for r in (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()
            if '"val_acc"' in r]
    vals = [json.loads(r)["val_acc"] for r in rows]
    assert len(vals) == 4 and run.best["val_acc"] == max(vals)
    ds = load_dataset(DATA, "val", transform=build_transform(run.model))
    again = tt.evaluate_model(run.model, ds, progress=False).top1
    assert again == pytest.approx(max(vals))
