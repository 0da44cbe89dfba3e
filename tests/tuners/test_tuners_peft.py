"""SNELL / SNELLA as PEFT tuners: get_peft_model, save_pretrained / from_pretrained,
merge_and_unload, disable_adapter, several adapters, HF Trainer; on a tiny timm ViT and a tiny
transformers ViT (random weights, no downloads)."""

import sys
from pathlib import Path

import peft
import pytest
import torch
from peft.utils import PeftType

from trimtune.errors import TrimtuneError
from trimtune.tuners import (
    SnellaConfig,
    SnellaTrainerCallback,
    SnellConfig,
    SnellLinear,
    attach,
    iter_units,
)
from trimtune.tuners.snell.peft_types import ensure_peft_types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import move_off_init, tiny_vit  # noqa: E402


def hf_vit(num_labels: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels))


def perturb(model, seed=1):
    """Stand-in for training: every trainable tensor moves; unit sparsities differ."""
    move_off_init(model, seed=seed)
    for i, (_, u) in enumerate(iter_units(model)):
        u.sparsity = 0.1 + 0.03 * i
    return model


def sparsities(model):
    return [u.sparsity for _, u in iter_units(model)]


def test_peft_type_shim_against_pinned_peft():
    ensure_peft_types()  # idempotent
    assert PeftType("SNELLA") is PeftType.SNELLA and "SNELL" in list(PeftType)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SNELLA] is SnellaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SNELL].__name__ == "SnellModel"
    assert SnellaConfig().peft_type is PeftType.SNELLA
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pin = [r for r in project["project"]["dependencies"] if r.startswith("peft")]
    assert pin == [f"peft=={peft.__version__}"], "the shim is tested against the pinned peft"


def test_get_peft_model_timm_trains_only_adapter_and_merges(images):
    base = tiny_vit()
    ref = base(images).detach()
    # train_tokens change base parameters (as LoRA's bias="all"): off here, so that
    # disable_adapter gives the base model back exactly
    pm = peft.get_peft_model(base, SnellaConfig(r=4, init_sparsity=0.3, train_tokens=None,
                                                target_modules=["qkv", "fc1"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".snell_units.default." in n or ".modules_to_save.default." in n
                             for n in trainable)
    assert sum(isinstance(m, SnellLinear) for m in pm.modules()) == 4
    perturb(pm)
    pm.eval()
    y = pm(images)
    assert not torch.allclose(y, ref)
    with pm.disable_adapter():  # the head copy and the units both switch off
        torch.testing.assert_close(pm(images), ref, atol=0, rtol=0)
    pm.merge_adapter()
    torch.testing.assert_close(pm(images), y, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, SnellLinear) for m in merged.modules())
    torch.testing.assert_close(merged(images), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [SnellConfig(r=4, sparsity=0.2),
                                    SnellaConfig(r=4, target_modules="all-linear")])
def test_peft_save_load_round_trip_exact(tmp_path, images, config):
    pm = perturb(peft.get_peft_model(tiny_vit(), config)).eval()
    pm.save_pretrained(str(tmp_path))
    back = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path)).eval()
    assert type(back.peft_config["default"]) is type(config)
    assert sparsities(back) == sparsities(pm) and len(set(sparsities(pm))) > 1
    a, b = pm.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(back(images), pm(images))


def test_several_adapters(tmp_path, images):
    pm = peft.get_peft_model(tiny_vit(), SnellConfig(r=4, target_modules=["qkv"]))
    perturb(pm, seed=1)
    pm.add_adapter("other", SnellConfig(r=2, target_modules=["qkv", "fc2"], sparsity=0.4))
    layer = pm.base_model.model.blocks[0].attn.qkv
    assert set(layer.snell_units) == {"default", "other"}
    pm.set_adapter("other")
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".default." in n)
    perturb(pm, seed=2)
    pm.eval()
    y_other = pm(images)
    pm.set_adapter("default")
    y_default = pm(images)
    assert not torch.allclose(y_other, y_default)
    with pytest.raises(ValueError, match="already exists"):  # PEFT's own error
        pm.add_adapter("other", SnellConfig(r=2))
    pm.save_pretrained(str(tmp_path))  # default in tmp_path, "other" in tmp_path/other
    back = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path)).eval()
    back.load_adapter(str(tmp_path / "other"), adapter_name="other")
    with torch.no_grad():
        assert torch.equal(back(images), y_default)
        back.set_adapter("other")
        assert torch.equal(back(images), y_other)
    back.delete_adapter("other")
    assert set(back.base_model.model.blocks[0].attn.qkv.snell_units) == {"default"}


def test_attach_is_the_same_tuner(images):
    """trimtune.attach injects the PEFT tuner's layers in place: same state dict keys (up to
    PEFT's wrapper prefix) and the same outputs as get_peft_model."""
    torch.manual_seed(3)
    plain = attach(tiny_vit(), SnellaConfig(r=4))
    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny_vit(), SnellaConfig(r=4))
    keys = {k.removeprefix("base_model.model.") for k in pm.state_dict()}
    assert keys == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), pm.eval()(images))


def test_unit_sparsity_is_a_buffer_in_the_state_dict():
    model = attach(tiny_vit(), SnellConfig(r=2, target_modules=["fc1"]))
    name, unit = next(iter_units(model))
    unit.sparsity = 0.25
    sd = model.state_dict()
    assert sd[f"{name}.zeroed"].dtype == torch.long
    assert int(sd[f"{name}.zeroed"]) == unit.numel_update // 4
    other = attach(tiny_vit(), SnellConfig(r=2, target_modules=["fc1"]))
    other.load_state_dict(sd)
    assert dict(iter_units(other))[name].sparsity == 0.25
    model.to(torch.bfloat16)  # a cast never rounds the sparsity
    assert unit.zeroed.dtype == torch.long and unit.sparsity == 0.25


def test_bad_peft_inputs():
    with pytest.raises(TrimtuneError, match="closest module names: .*qkv"):
        peft.get_peft_model(tiny_vit(), SnellConfig(target_modules=["qkvv"]))
    with pytest.raises(TrimtuneError, match="SnellaConfig"):
        SnellaTrainerCallback(SnellConfig())
    lora = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="different peft types"):  # PEFT's own check
        lora.add_adapter("second", SnellConfig(r=2))
    with pytest.raises(TrimtuneError, match="PeftModel"):
        attach(lora, SnellConfig(r=2))


# ----------------------------------------------------------------------------- HF Trainer


class Images(torch.utils.data.Dataset):
    def __init__(self, key: str, n: int = 16, classes: int = 3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.key = key

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {self.key: self.x[i], "labels": self.y[i]}


def train_with_hf_trainer(pm, key, out, **kw):
    from transformers import Trainer, TrainingArguments

    cfg = pm.peft_config["default"]
    args = TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", remove_unused_columns=False,
                             label_names=["labels"], dataloader_num_workers=0)
    trainer = Trainer(model=pm, args=args, train_dataset=Images(key),
                      callbacks=[SnellaTrainerCallback(cfg)], **kw)
    trainer.train()
    return trainer


def check_reload_exact(pm, fresh, x, tmp_path, **call):
    pm.save_pretrained(str(tmp_path / "adapter"))
    back = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    pm.eval()
    assert sparsities(back) == sparsities(pm)
    with torch.no_grad():
        a, b = pm(**{**call, "pixel_values" if call else "x": x}), back(
            **{**call, "pixel_values" if call else "x": x})
    a, b = (getattr(a, "logits", a), getattr(b, "logits", b))
    assert torch.equal(a, b)


def test_hf_trainer_timm_vit(tmp_path, images, one_thread):
    pm = peft.get_peft_model(tiny_vit(num_classes=3), SnellaConfig(
        r=4, init_sparsity=0.1, target_sparsity=0.6))
    before = sparsities(pm)

    def ce(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs, labels)

    train_with_hf_trainer(pm, "x", tmp_path / "hf", compute_loss_func=ce)
    after = sparsities(pm)
    assert after != before and len(set(after)) > 1  # the allocator moved per-unit sparsities
    check_reload_exact(pm, tiny_vit(num_classes=3), images, tmp_path)


def test_hf_trainer_transformers_vit(tmp_path, images, one_thread):
    pm = peft.get_peft_model(hf_vit(), SnellaConfig(r=4, init_sparsity=0.1, target_sparsity=0.6,
                                                    target_modules="all-linear",
                                                    modules_to_save=["classifier"],
                                                    train_tokens=["cls_token"]))
    names = [n for n, m in pm.named_modules() if isinstance(m, SnellLinear)]
    assert len(names) == 2 * 6 and not any("classifier" in n for n in names)
    w0 = pm.base_model.model.vit.embeddings.cls_token.detach().clone()
    before = sparsities(pm)
    train_with_hf_trainer(pm, "pixel_values", tmp_path / "hf")
    assert sparsities(pm) != before
    assert not torch.equal(pm.base_model.model.vit.embeddings.cls_token, w0)  # train_tokens
    check_reload_exact(pm, hf_vit(), images, tmp_path, interpolate_pos_encoding=False)
