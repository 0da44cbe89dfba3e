"""create_backbone on timm names and local weight files; arch_of / build_from_arch; bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from trimtune.checkpoint import torch_save_atomic, write_safetensors
from trimtune.errors import TrimtuneError
from trimtune.models import arch_of, build_from_arch, create_backbone, load_weights

ARCH = "vit_tiny_patch16_224"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY  # noqa: E402


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(ARCH, pretrained=False, **{"num_classes": 5, **TINY, **kw})


def same_weights(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa
                                      if not k.startswith(skip))


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_nested", "bin_ddp"])
def test_weight_file_round_trip(tmp_path, images, fmt):
    src = tiny().eval()
    sd = src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        write_safetensors(path, sd)
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch_save_atomic(sd, path)
    elif fmt == "pth_nested":
        path = tmp_path / "w.pth"
        torch_save_atomic({"model": sd, "epoch": 3}, path)
    else:
        path = tmp_path / "w.bin"
        torch_save_atomic({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = create_backbone(ARCH, weights=path, num_classes=5, **TINY).eval()
    assert same_weights(src, model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), src(images))
    assert model.trimtune_arch == {"arch": ARCH, "kwargs": {"num_classes": 5, **TINY}}


def test_weight_file_new_head_and_img_size(tmp_path):
    src = tiny()
    path = tmp_path / "w.safetensors"
    write_safetensors(path, src.state_dict())
    model = create_backbone(ARCH, weights=path, num_classes=3, **{**TINY, "img_size": 48})
    assert model.head.out_features == 3
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 64)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)
    assert same_weights(src, model, skip=("head.", "pos_embed"))
    # resampled grid keeps the cls position; the 6x6 grid interpolates the 4x4 one
    torch.testing.assert_close(model.pos_embed[:, :1], src.pos_embed[:, :1])
    grid = model.pos_embed[0, 1:].reshape(6, 6, 64)
    lo, hi = src.pos_embed[0, 1:].min(), src.pos_embed[0, 1:].max()
    assert torch.isfinite(grid).all() and grid.abs().max() <= 2 * max(lo.abs(), hi.abs())
    features = create_backbone(ARCH, weights=path, num_classes=0, **TINY)
    assert isinstance(features.head, nn.Identity)
    with torch.no_grad():
        assert features(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_load_weights_into_existing_model(tmp_path):
    src = tiny()
    path = tmp_path / "w.pth"
    torch_save_atomic(src.state_dict(), path)
    assert same_weights(src, load_weights(tiny(num_classes=5, depth=2).apply(_reinit), path))


def _reinit(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.weight)


def test_wrong_architecture_file_names_keys(tmp_path):
    path = tmp_path / "deeper.safetensors"
    write_safetensors(path, tiny(depth=3, embed_dim=32).state_dict())
    with pytest.raises(TrimtuneError) as e:
        create_backbone(ARCH, weights=path, num_classes=5, **TINY)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "unexpected" in msg and "blocks.2." in msg
    assert "shape mismatches" in msg and "[32" in msg and "64]" in msg
    assert "depth=" in msg  # the fix


@pytest.mark.parametrize("bad,match", [
    ("missing.safetensors", "not found"),
    ("notes.txt", "suffix"),
])
def test_bad_weight_paths(tmp_path, bad, match):
    path = tmp_path / bad
    if bad.endswith(".txt"):
        path.write_text("hello")
    with pytest.raises(TrimtuneError, match=match):
        create_backbone(ARCH, weights=path, **TINY)


def test_damaged_weight_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(TrimtuneError, match="state dict"):
        create_backbone(ARCH, weights=path, **TINY)


def test_unknown_name_suggests_close_names():
    with pytest.raises(TrimtuneError, match=r"unknown model 'vit_smal_patch16_224'.*"
                                            r"did you mean .*vit_small_patch16_224"):
        create_backbone("vit_smal_patch16_224", pretrained=False)
    with pytest.raises(TrimtuneError, match=r"dinov2_small\.imgfocus"):
        create_backbone("dinov2_smal.imgfocus")
    with pytest.raises(TrimtuneError, match="weights=FILE"):
        create_backbone("my_weights.safetensors")


def test_img_size_not_divisible():
    with pytest.raises(TrimtuneError, match=r"img_size 36 is not divisible by .* 8: use 32 or 40"):
        create_backbone(ARCH, pretrained=False, **{**TINY, "img_size": 36})


def test_offline_hub_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent/hf")  # nothing cached
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/torch")
    with pytest.raises(TrimtuneError) as e:
        create_backbone(ARCH, pretrained=True, num_classes=5, **TINY)
    msg = str(e.value)
    assert "dinov2_small.imgfocus" in msg and "weights=FILE" in msg and "pretrained=False" in msg


def test_arch_of_plain_timm_model_round_trip(vit, images):
    rec = arch_of(vit)  # built by timm directly, no trimtune_arch
    assert rec["arch"] == ARCH
    assert rec["kwargs"] == {"num_classes": 5, **TINY}
    rebuilt = build_from_arch(rec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in vit.state_dict().items()}
    rebuilt.load_state_dict(vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), vit.eval()(images))
    assert arch_of(rebuilt) == rec and rebuilt.pretrained_cfg["input_size"] == (3, 32, 32)


def test_arch_of_json_round_trip():
    import json

    model = tiny(drop_path_rate=0.1)
    rec = json.loads(json.dumps(arch_of(model)))
    assert rec["kwargs"]["drop_path_rate"] == 0.1
    assert build_from_arch(rec).pos_embed.shape == model.pos_embed.shape


def test_arch_of_errors():
    with pytest.raises(TrimtuneError, match="trimtune_arch"):
        arch_of(nn.Linear(3, 4))
    odd = timm.create_model(ARCH, pretrained=False, **TINY)
    odd.blocks[0].mlp.fc1 = nn.Linear(64, 100)  # not expressible as kwargs
    with pytest.raises(TrimtuneError, match="cannot infer"):
        arch_of(odd)
    with pytest.raises(TrimtuneError, match="unknown model"):
        build_from_arch({"arch": "no_such_net", "kwargs": {}})
    with pytest.raises(TrimtuneError, match="architecture record"):
        build_from_arch({"kwargs": {}})


def test_network_error_becomes_offline_message(monkeypatch):
    # not offline by env, but the download fails: same one-line message, no network touched
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = timm.create_model

    def no_network(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("Temporary failure in name resolution")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(TrimtuneError, match=r"OSError: Temporary failure.*pretrained=False"):
        create_backbone(ARCH, pretrained=True, **TINY)


def test_cnn_img_size_sets_data_config_only():
    model = create_backbone("resnet18", pretrained=False, num_classes=4, img_size=96)
    assert model.pretrained_cfg["input_size"] == (3, 96, 96)
    rec = arch_of(model)
    assert rec["kwargs"] == {"num_classes": 4} and rec["img_size"] == 96
    assert build_from_arch(rec).pretrained_cfg["input_size"] == (3, 96, 96)


def test_bad_timm_kwarg():
    with pytest.raises(TrimtuneError, match="does not take"):
        create_backbone(ARCH, pretrained=False, no_such_kwarg=1, **TINY)


def test_arch_of_factorised_plain_model(vit):
    # a model whose Linear layers trimtune.lowrank replaced: those keys are not compared
    vit.blocks[0].mlp.fc1 = nn.Sequential(nn.Linear(64, 8, bias=False), nn.Linear(8, 256))
    with pytest.raises(TrimtuneError, match="cannot infer"):
        arch_of(vit)
    vit.trimtune_lowrank = {"ranks": {"blocks.0.mlp.fc1": 8}, "policy": {}, "skip": []}
    assert arch_of(vit) == {"arch": ARCH, "kwargs": {"num_classes": 5, **TINY}}


def test_offline_uses_locally_cached_hub_file(tmp_path, monkeypatch):
    from trimtune.models import factory

    src = tiny()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, src.state_dict())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory, "_local_hub_file", lambda cfg: str(path))
    model = create_backbone(ARCH, pretrained=True, num_classes=5, **TINY)
    assert same_weights(src, model, skip=("head.",))


def test_same_call_same_model_whatever_the_global_rng():
    """A fresh head (here: every weight, pretrained=False) is drawn from create_backbone's own
    seed in a forked RNG: the same call gives the same model after any global RNG history, and
    leaves the global RNG where it was; another seed gives another model; seed=None is timm's
    behaviour (the global RNG decides)."""
    kw = {"num_classes": 5, **TINY}
    torch.manual_seed(123)
    a = create_backbone(ARCH, pretrained=False, **kw)
    torch.manual_seed(456)
    state = torch.get_rng_state()
    b = create_backbone(ARCH, pretrained=False, **kw)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was advanced"
    assert same_weights(a, b)
    assert not same_weights(a, create_backbone(ARCH, pretrained=False, seed=1, **kw))
    torch.manual_seed(7)
    c = create_backbone(ARCH, pretrained=False, seed=None, **kw)
    torch.manual_seed(8)
    d = create_backbone(ARCH, pretrained=False, seed=None, **kw)
    assert not same_weights(c, d)
    with pytest.raises(TrimtuneError, match="seed=.*not an integer"):
        create_backbone(ARCH, pretrained=False, seed="0", **kw)
