"""Compressed-model format: round trip, rebuild from the JSON alone, tampered files."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from trimtune.errors import TrimtuneError
from trimtune.lowrank import (LowRankLinear, compress, factorise_like, factorised_layers,
                              load_compressed, save_compressed)


@pytest.fixture
def saved(vit, tmp_path):
    lr = compress(vit, ratio=2.0).eval()
    save_compressed(lr, tmp_path / "c")
    return lr, tmp_path / "c"


@torch.no_grad()
def test_round_trip_identical_outputs(saved, images):
    lr, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "trimtune.json"]
    cfg = json.loads((path / "trimtune.json").read_text())
    assert cfg["arch"]["arch"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 5
    assert cfg["ranks"] == lr.trimtune_lowrank["ranks"] and cfg["format_version"] == 1
    assert cfg["policy"]["type"] == "ratio" and "head" in cfg["skip"] and cfg["trimtune_version"]
    back = load_compressed(path)
    assert torch.equal(back(images), lr(images))
    assert {n: m.rank for n, m in factorised_layers(back).items()} == cfg["ranks"]
    assert back.trimtune_lowrank["ranks"] == cfg["ranks"]
    # the reloaded model saves again to the same record
    save_compressed(back, path.parent / "again")
    again = json.loads((path.parent / "again" / "trimtune.json").read_text())
    assert again["ranks"] == cfg["ranks"]


@torch.no_grad()
def test_other_head_size_and_swin_round_trip(tmp_path):
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32,
                             depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=32,
                             patch_size=2, num_classes=17)
    swin.trimtune_arch = {"arch": "swin_tiny_patch4_window7_224",
                          "kwargs": dict(embed_dim=32, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4, img_size=32, patch_size=2)}
    lr = compress(swin, ratio=1.5, exclude=["attn.proj"]).eval()
    save_compressed(lr, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "trimtune.json").read_text())["num_classes"] == 17
    back = load_compressed(tmp_path / "s")
    x = torch.randn(2, 3, 32, 32)
    assert back(x).shape == (2, 17) and torch.equal(back(x), lr(x))


def _edit_json(path, fn):
    cfg = json.loads((path / "trimtune.json").read_text())
    fn(cfg)
    (path / "trimtune.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["arch"].update(arch="no_such_vit_9000"), "no_such_vit_9000"),
    (lambda c: c.pop("ranks"), "ranks"),
    (lambda c: c.pop("arch"), "arch"),
    (lambda c: c["ranks"].update({"blocks.0.attn.qkv": 999}), "does not fit"),
    (lambda c: c["ranks"].update({"blocks.0.attn.qkv": 5}), "shape"),
    (lambda c: c["ranks"].update({"blocks.0.norm1": 4}), "not a linear"),
    (lambda c: c["ranks"].pop("blocks.1.mlp.fc2"), "unexpected keys"),
    (lambda c: c.update(format_version=99), "format version"),
    (lambda c: c["arch"]["kwargs"].update(embed_dim=96), "shape|keys"),
])
def test_tampered_json_raises(saved, edit, words):
    _, path = saved
    _edit_json(path, edit)
    with pytest.raises(TrimtuneError, match=words):
        load_compressed(path)


def test_tampered_weights_raise(saved):
    _, path = saved
    w = path / "model.safetensors"
    state = load_file(str(w))
    good = dict(state)

    state.pop("blocks.0.attn.qkv.first.weight")
    save_file(state, str(w))
    with pytest.raises(TrimtuneError, match="missing keys"):
        load_compressed(path)

    save_file({**good, "extra.weight": torch.zeros(2)}, str(w))
    with pytest.raises(TrimtuneError, match="unexpected keys"):
        load_compressed(path)

    save_file({**good, "blocks.0.mlp.fc1.second.weight": torch.zeros(3, 3)}, str(w))
    with pytest.raises(TrimtuneError, match="shape"):
        load_compressed(path)

    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TrimtuneError, match="damaged"):
        load_compressed(path)

    w.unlink()
    with pytest.raises(TrimtuneError, match="not found"):
        load_compressed(path)


def test_damaged_or_missing_json(saved, tmp_path):
    _, path = saved
    (path / "trimtune.json").write_text("{ not json")
    with pytest.raises(TrimtuneError, match="not valid JSON"):
        load_compressed(path)
    (path / "trimtune.json").unlink()
    with pytest.raises(TrimtuneError, match="not found"):
        load_compressed(path)
    with pytest.raises(TrimtuneError, match="not a folder"):
        load_compressed(tmp_path / "nowhere")


def test_save_needs_compressed_model_and_known_arch(vit, tmp_path):
    with pytest.raises(TrimtuneError, match="compress"):
        save_compressed(vit, tmp_path / "x")
    plain = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    with pytest.raises(TrimtuneError, match="trimtune_arch"):
        save_compressed(compress(plain), tmp_path / "y")
    assert not (tmp_path / "y" / "trimtune.json").exists()


def test_factorise_like_builds_empty_tree(vit):
    ranks = {"blocks.0.attn.qkv": 4, "blocks.1.mlp.fc2": 6}
    out = factorise_like(vit, ranks)
    assert out is vit and isinstance(vit.blocks[0].attn.qkv, LowRankLinear)
    assert vit.blocks[1].mlp.fc2.rank == 6 and vit.blocks[1].mlp.fc2.second.bias is not None


# ---- transformers models: trimtune reloads them exactly, stock from_pretrained refuses --------
def _hf_builders():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import conftest
    return [conftest.hf_vit, conftest.hf_clip_vision, conftest.hf_bert, conftest.hf_llama,
            conftest.hf_qwen2]


def _tied_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=100, num_key_value_heads=1, hidden_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, tie_word_embeddings=True))


@pytest.mark.parametrize("builder", _hf_builders() + [_tied_qwen2],
                         ids=["vit", "clip_vision", "bert", "llama", "qwen2", "qwen2_tied"])
def test_compressed_transformers_model_reloads_exactly_and_stock_loader_refuses(builder,
                                                                               tmp_path):
    from trimtune.models.probe import example_input

    small = compress(builder(), ratio=2.0).eval()
    x = example_input(small, batch_size=2)
    with torch.no_grad():
        want = small(**x)[0]
    small.save_pretrained(tmp_path / "hf")  # HF's own method (what Trainer calls): our format
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "trimtune.json", "trimtune_model.safetensors"]
    for folder in (tmp_path / "hf", save_compressed(small, tmp_path / "tt")):
        back = load_compressed(folder)
        assert type(back) is type(small) and back.trimtune_lowrank["ranks"] == \
            small.trimtune_lowrank["ranks"]
        with torch.no_grad():
            assert torch.equal(back(**x)[0], want)
        with pytest.raises(OSError, match="no file named model.safetensors"):
            type(small).from_pretrained(folder)  # instead of re-initialising the factors
    tied = getattr(small.config, "tie_word_embeddings", False) and hasattr(back, "lm_head")
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    back.save_pretrained(tmp_path / "again")  # a reloaded model saves our format too
    assert (tmp_path / "again" / "trimtune_model.safetensors").is_file()


def test_transformers_folder_with_stock_weights_is_refused(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import hf_bert

    dense = hf_bert()
    dense.save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TrimtuneError, match="holds model.safetensors.*another folder"):
        save_compressed(compress(dense, ratio=2.0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
