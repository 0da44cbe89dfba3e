"""trimtune export: merged models that stock timm and ONNX Runtime read exactly."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import move_off_init, tiny_vit  # noqa: E402

from trimtune.cli import main  # noqa: E402
from trimtune.errors import TrimtuneError  # noqa: E402
from trimtune.export import export  # noqa: E402
from trimtune.lowrank import compress  # noqa: E402
from trimtune.runs import merge, save_model  # noqa: E402
from trimtune.tuners import SnellaConfig, attach  # noqa: E402


def trained_snella(model):
    """An attached SNELLA adapter with non-zero factors and a changed head (as after training)."""
    attach(model, SnellaConfig(r=4, init_sparsity=0.3))
    return move_off_init(model).eval()


def test_timm_local_dir_reads_the_merged_model_head_included(tmp_path, images, one_thread):
    model = trained_snella(tiny_vit())
    with torch.no_grad():
        want = model(images)
    export(model, tmp_path / "timm", "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 5
    stock = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(images), want, atol=1e-5, rtol=0)


def test_cli_exports_a_model_folder(tmp_path, images, capsys, one_thread):
    model = merge(trained_snella(tiny_vit()))
    save_model(model, tmp_path / "merged")
    assert main(["export", str(tmp_path / "merged"), "--format", "timm",
                 "--out", str(tmp_path / "t")]) == 0
    assert "local-dir" in capsys.readouterr().out
    stock = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_onnx_runtime_matches_the_merged_model(tmp_path, images, compressed, one_thread):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_vit()
    if compressed:
        model = compress(model, ratio=2.0)
    model = trained_snella(model)
    with torch.no_grad():
        want = model(images)
    export(model, tmp_path / "onnx", "onnx")
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = sess.run(None, {"input": images.numpy()})[0]  # batch 4: the exported batch was 2
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "onnx" / "data_config.json").read_text())["input_size"] == [
        3, 32, 32]


def test_compressed_model_to_timm_is_refused_and_nothing_written(tmp_path, one_thread):
    model = compress(tiny_vit(), ratio=2.0)
    with pytest.raises(TrimtuneError, match="compressed.*onnx.*load_model"):
        export(model, tmp_path / "x", "timm")
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind
    save_model(model, tmp_path / "c")
    assert main(["export", str(tmp_path / "c"), "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(FileNotFoundError):  # stock timm on a trimtune folder: no config.json
        timm.create_model(f"local-dir:{tmp_path / 'c'}", pretrained=True)


def test_transformers_from_pretrained_reads_the_merged_model(tmp_path, one_thread):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, num_labels=5))
    attach(model, SnellaConfig(r=4, target_modules=r".*\.(q_proj|v_proj|fc1|fc2)",
                               modules_to_save=["classifier"]))
    move_off_init(model, seed=0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = model(pixel_values=x).logits
    export(model, tmp_path / "hf", "transformers")
    back = ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(TrimtuneError, match="re-initialise its factors"):
        export(compress(back, ratio=2.0), tmp_path / "hf2", "transformers")


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, one_thread):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(TrimtuneError, match=r"not enough free space in .*: it needs about .* "
                                            r"bytes\), 1.0 KiB are free; free some space"):
        export(tiny_vit(), tmp_path / "x", "timm")
    assert not list(tmp_path.iterdir())
