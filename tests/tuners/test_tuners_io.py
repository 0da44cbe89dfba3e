"""Adapter save / load: PEFT's files (opened by PEFT too), exact round trip, wrong base
refused."""

import sys
from pathlib import Path

import pytest
import timm
import torch

from trimtune.checkpoint import read_json
from trimtune.errors import TrimtuneError
from trimtune.tuners import SnellaConfig, SnellConfig, attach, iter_units, load_adapter, merge
from trimtune.tuners.snell.io import save_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, move_off_init, tiny_vit  # noqa: E402


def trained_adapter(config):
    model = attach(tiny_vit(), config)
    move_off_init(model)  # stand-in for training: every trainable tensor changes
    for i, (_, u) in enumerate(iter_units(model)):
        u.sparsity = 0.1 + 0.05 * i  # as the allocator would leave them
    return model.eval()


@pytest.mark.parametrize("config", [SnellConfig(r=4), SnellaConfig(r=4, kernel="mixture")])
def test_round_trip_exact(tmp_path, images, config):
    model = trained_adapter(config)
    save_adapter(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}
    meta = read_json(tmp_path / "ad" / "adapter_config.json")
    assert meta["peft_type"] == config.method.upper() and meta["r"] == 4  # PEFT's keys
    assert meta["target_modules"] is None and meta["modules_to_save"] == ["head"]

    fresh = load_adapter(tiny_vit(), tmp_path / "ad").eval()
    cfg = fresh.peft_config["default"]
    assert type(cfg) is type(config) and cfg.to_dict() == {**config.to_dict(),
                                                            "inference_mode": False}
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [u.sparsity for _, u in iter_units(fresh)] == [u.sparsity for _, u in iter_units(model)]
    assert len({u.sparsity for _, u in iter_units(fresh)}) == 12  # per unit, not one value
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))


def test_trimtune_adapter_opens_with_peft(tmp_path, images):
    """The folder trimtune writes is a PEFT adapter: PeftConfig / PeftModel.from_pretrained."""
    import peft

    model = trained_adapter(SnellaConfig(r=4))
    save_adapter(model, tmp_path / "ad")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "ad"))
    assert type(cfg) is SnellaConfig and cfg.r == 4
    pm = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "ad")).eval()
    assert [u.sparsity for _, u in iter_units(pm)] == [u.sparsity for _, u in iter_units(model)]
    with torch.no_grad():
        assert torch.equal(pm(images), model(images))
    pm.save_pretrained(str(tmp_path / "peft"))  # and what PEFT writes, trimtune loads
    back = load_adapter(tiny_vit(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.equal(back(images), model(images))


def test_refuses_other_method(tmp_path):
    import peft

    lora = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(TrimtuneError, match="LORA adapter, not SNELL/SNELLA"):
        load_adapter(tiny_vit(), tmp_path / "lora")


def test_refuses_other_base(tmp_path):
    save_adapter(trained_adapter(SnellConfig(r=4)), tmp_path / "ad")
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, **TINY)
    with pytest.raises(TrimtuneError, match="vit_tiny_patch16_224"):
        load_adapter(other, tmp_path / "ad")
    wider = tiny_vit(embed_dim=32)
    with pytest.raises(TrimtuneError, match="same base"):
        load_adapter(wider, tmp_path / "ad")
    with pytest.raises(TrimtuneError, match="already has an adapter"):
        load_adapter(attach(tiny_vit(), SnellConfig(r=2)), tmp_path / "ad")


def test_bad_save_and_missing_files(tmp_path):
    with pytest.raises(TrimtuneError, match="no SNELL/SNELLA adapter"):
        save_adapter(tiny_vit(), tmp_path / "x")
    model = trained_adapter(SnellConfig(r=2))
    merge(model)
    with pytest.raises(TrimtuneError, match="no SNELL/SNELLA adapter"):
        save_adapter(model, tmp_path / "x")
    with pytest.raises(TrimtuneError, match="not found"):
        load_adapter(tiny_vit(), tmp_path / "nowhere")
