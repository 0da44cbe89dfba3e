"""Method x contract, in PEFT's test style: every method of the registry on a tiny timm ViT.

Contracts: only the method's parameters train; merged == unmerged; trimtune save / load round
trip; PEFT save / load round trip (PEFT-capable methods); the same target pattern selects the
same layers for every method that takes targets."""

import sys
from pathlib import Path

import peft
import pytest
import timm
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import trimtune as tt
from trimtune.errors import TrimtuneError
from trimtune.names import METHODS
from trimtune.tuners import SnellaConfig, SnellConfig, SnellLinear, registry
from trimtune.tuners.targets import select_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, move_off_init, tiny_vit  # noqa: E402

TARGETED = ("snella", "snell", "lora", "dora", "adalora", "masked-sparse")
OPTIONS = {"snella": dict(r=4, init_sparsity=0.2), "snell": dict(r=4, sparsity=0.3),
           "lora": dict(r=4), "dora": dict(r=4), "adalora": dict(r=2, total_step=10),
           "masked-sparse": dict(density=0.3)}


DEFAULT_WEIGHTS = {f"{n}.weight" for n in select_linears(tiny_vit(), None,
                                                        modules_to_save=["head"])}


def expected_trainable(method: str, name: str) -> bool:
    """Which parameters a method trains (by name, after attach)."""
    head = name.startswith("head.") and ".original_module." not in name
    return {
        "snella": ".snell_units." in name or head or name == "cls_token",
        "snell": ".snell_units." in name or head or name == "cls_token",
        "lora": "lora_" in name or head,
        "dora": "lora_" in name or head,
        "adalora": "lora_" in name or head,
        "full": True,
        "linear": head,
        "bitfit": name.endswith("bias") or head,
        "masked-sparse": name in DEFAULT_WEIGHTS or head,
    }[method]


def attached(method: str) -> nn.Module:
    return tt.attach(tiny_vit(), method, **OPTIONS.get(method, {}))


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    return move_off_init(model, seed=seed)


def test_registry_is_the_one_list():
    assert tuple(registry.REGISTRY) == METHODS
    for name, m in registry.REGISTRY.items():
        assert m.name == name and m.summary and m.holds


@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_parameters_train(method, images):
    model = attached(method)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {n for n, _ in model.named_parameters() if expected_trainable(method, n)}
    assert names == want, sorted(names ^ want)[:6]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model(images), torch.arange(4) % 5).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), f"{method} moved frozen {n}"


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(method, images):
    model = perturb(attached(method)).eval()
    with torch.no_grad():
        ref = model(images)
        plain = tt.merge(model)
        out = plain(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert plain.state_dict().keys() == tiny_vit().state_dict().keys()


@pytest.mark.parametrize("method", METHODS)
def test_trimtune_save_load_round_trip(method, images, tmp_path):
    model = perturb(attached(method)).eval()
    tt.save(model, tmp_path / "adapter")
    back = tt.load(tiny_vit(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(back(images), model(images))


PEFT_CONFIGS = {
    "snella": lambda: SnellaConfig(r=4, init_sparsity=0.2, target_modules=["qkv", "fc1"]),
    "snell": lambda: SnellConfig(r=4, sparsity=0.3, target_modules=["qkv", "fc1"]),
    "lora": lambda: peft.LoraConfig(r=4, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
    "dora": lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["qkv", "fc1"]),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                          target_modules=["qkv", "fc1"]),
}


@pytest.mark.parametrize("method", [m for m in METHODS if m in PEFT_CONFIGS])
def test_peft_save_load_round_trip(method, images, tmp_path):
    config = PEFT_CONFIGS[method]()
    assert registry.method_of_config(config) == method
    assert isinstance(config, registry.get(method).config_class)
    pm = perturb(peft.get_peft_model(tiny_vit(), config)).eval()
    pm.save_pretrained(str(tmp_path))
    back = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(images), pm(images), atol=0, rtol=0)


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the layers an attached method adapts, whatever the method."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, BaseTunerLayer) or hasattr(m, "trimtune_grad_mask"):
            out.append(n)
    return out


@pytest.mark.parametrize("pattern", [["qkv", "mlp.fc2"], r".*\.(qkv|fc1)", "all-linear", None])
def test_same_pattern_same_layers_for_every_method(pattern):
    want = select_linears(tiny_vit(), pattern, modules_to_save=["head"])
    assert want and "head" not in want
    for method in TARGETED:
        model = tt.attach(tiny_vit(), method, target_modules=pattern, **OPTIONS[method])
        assert adapted_layers(model) == want, method


def test_bad_inputs_one_clear_error_each(tmp_path):
    # a target pattern that matches nothing: the closest names, for every method
    for method in TARGETED:
        with pytest.raises(TrimtuneError, match="closest module names: .*fc1"):
            tt.attach(tiny_vit(), method, target_modules=["fc_1"], **OPTIONS[method])
    # a second method (or the same name twice) on one model
    model = attached("lora")
    with pytest.raises(TrimtuneError, match=r"already has an adapter attached \(lora\)"):
        tt.attach(model, SnellaConfig(r=4))
    # a config of a method trimtune does not run
    with pytest.raises(TrimtuneError, match="not a method trimtune runs"):
        tt.attach(tiny_vit(), peft.IA3Config(target_modules=["qkv"], feedforward_modules=[]))
    with pytest.raises(TrimtuneError, match="unknown method 'prefix'"):
        tt.attach(tiny_vit(), "prefix")
    # an adapter of another method / tool on disk
    tt.save(perturb(attached("bitfit")), tmp_path / "bitfit")
    (tmp_path / "bitfit" / "adapter_config.json").write_text('{"method": "ia3"}')
    with pytest.raises(TrimtuneError, match="names method 'ia3'"):
        tt.load(tiny_vit(), tmp_path / "bitfit")


@pytest.mark.parametrize("method", ["lora", "adalora", "masked-sparse", "bitfit"])
def test_adapter_for_another_base_is_one_error(method, tmp_path):
    """trimtune's own adapter files (non-PEFT methods): another architecture, width or depth."""
    tt.save(perturb(attached(method)), tmp_path / "ad")
    others = {"another architecture": timm.create_model(
                  "vit_small_patch16_224", pretrained=False, num_classes=5, **TINY),
              "wider": tiny_vit(embed_dim=32), "deeper": tiny_vit(depth=3)}
    for what, other in others.items():
        with pytest.raises(TrimtuneError, match="load it onto (the base it was trained on|a "
                                                "vit_tiny)"):
            tt.load(other, tmp_path / "ad")
            pytest.fail(f"{method} adapter loaded onto a {what} base")


def test_non_default_targets_round_trip(images, tmp_path):
    model = perturb(tt.attach(tiny_vit(), "lora", r=4, target_modules=["fc2"])).eval()
    tt.save(model, tmp_path / "ad")
    back = tt.load(tiny_vit(), tmp_path / "ad").eval()
    assert adapted_layers(back) == adapted_layers(model) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    with torch.no_grad():
        assert torch.equal(back(images), model(images))


def test_peft_adapter_of_another_method_is_one_error(tmp_path):
    """A PEFT folder of a method trimtune does not load itself (IA3, or PEFT's own LoRA
    folder) given to trimtune's loaders: one line naming PeftModel.from_pretrained."""
    for name, config in {"ia3": peft.IA3Config(target_modules=["qkv"], feedforward_modules=[]),
                         "lora": peft.LoraConfig(r=2, target_modules=["qkv"])}.items():
        peft.get_peft_model(tiny_vit(), config).save_pretrained(str(tmp_path / name))
        with pytest.raises(TrimtuneError, match="PeftModel.from_pretrained"):
            tt.load(tiny_vit(), tmp_path / name)
        with pytest.raises(TrimtuneError, match="PeftModel.from_pretrained"):
            tt.load_adapter(tiny_vit(), tmp_path / name)


def test_duplicate_adapter_name_is_one_error():
    model = peft.inject_adapter_in_model(SnellaConfig(r=4, target_modules=["qkv"]), tiny_vit())
    with pytest.raises(TrimtuneError, match="adapter 'default' already exists on "
                                            "blocks.0.attn.qkv: choose another adapter_name"):
        peft.inject_adapter_in_model(SnellConfig(r=2, target_modules=["qkv"]), model)
    pm = peft.get_peft_model(tiny_vit(), SnellaConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="'default' already exists"):  # PEFT's own error
        pm.add_adapter("default", SnellaConfig(r=2, target_modules=["qkv"]))


def test_attach_then_finetune(tmp_path):
    """DESIGN's example: tt.attach(...) then tt.finetune(model, ...) tunes what is attached."""
    model = tt.attach(tiny_vit(num_classes=4), SnellaConfig(r=4, target_sparsity=0.5))
    r = tt.finetune(model, "synthetic:classes=4,n=16,size=32", tt.TrainConfig(
        epochs=1, batch_size=8, lr=1e-2, out_dir=tmp_path / "run", progress=False))
    assert r.model is model and any(isinstance(m, SnellLinear) for m in model.modules())
    units = [u for _, u in tt.tuners.iter_units(model)]  # the allocator ran (starts at 0)
    assert sum(int(u.zeroed) for u in units) / sum(u.numel_update for u in units) > 0.25
    back = tt.load_model(tmp_path / "run")
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(back.eval()(x), model.eval()(x))
