"""``finetune(task="segmentation")`` and ``trimtune finetune --task segmentation`` end to end on a
tiny ViT: best-val selection on mIoU, the run folder reloads to the same predictions, merge
equals the unmerged model, and bad data is refused before anything is written."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trimtune as tt
from trimtune.checkpoint import read_json
from trimtune.cli import main
from trimtune.data.segmentation import seg_transform
from trimtune.heads import SegmentationModel
from trimtune.tasks import FinetuneConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seg_helpers import tiny_backbone, write_seg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    return write_seg(tmp_path_factory.mktemp("data") / "seg", n_train=16, n_val=8, n_test=4)


def _cfg(method: str, out: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(method=method, r=4, target_sparsity=0.5, task="segmentation",
                          train=tt.TrainConfig(epochs=2, batch_size=8, lr=3e-3, out_dir=out,
                                               progress=False, weight_decay=0.0), **kw)


def _test_images(model, seg: Path) -> torch.Tensor:
    ds = tt.load_dataset(f"seg:{seg}", "test").with_transform(seg_transform(model))
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.mark.parametrize("method,compressed", [("snella", True), ("lora", False),
                                               ("linear", False)])
def test_finetune_reload_merge(seg, tmp_path, method, compressed):
    bb = tt.compress(tiny_backbone(), ratio=2.0) if compressed else tiny_backbone()
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = tt.finetune(bb, f"seg:{seg}", _cfg(method, out), eval_data=f"seg:{seg}@val",
                        test_data=f"seg:{seg}@test")
    assert isinstance(r.model, SegmentationModel)
    assert set(r.best) == {"val_miou"} and 0 <= r.best["val_miou"] <= 1
    res = read_json(out / "results.json")
    assert res["test_miou"] == r.test["miou"] and 0 <= res["test_pixel_acc"] <= 1
    vals = [rec["val_miou"] for rec in map(json.loads, (out / "metrics.jsonl").read_text()
                                           .splitlines()) if "val_miou" in rec]
    assert len(vals) == 2 and r.best["val_miou"] == max(vals)  # best-val selection on mIoU
    for f in ("run.json", "adapter/adapter_config.json", "masks.png", "curves.png", "base"):
        assert (out / f).exists(), f
    run = read_json(out / "run.json")
    assert run["config"]["task"] == "segmentation"

    x = _test_images(r.model, seg)
    r.model.eval()
    with torch.no_grad():
        want = r.model(x)
        back = tt.load_model(str(out))
        assert isinstance(back, SegmentationModel) and tt.is_compressed(back) == compressed
        torch.testing.assert_close(back(x), want)
        plain = tt.merge(back)
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-4)
        folder = tt.save_model(plain, tmp_path / "merged")
        torch.testing.assert_close(tt.load_model(str(folder)).eval()(x), want, atol=1e-5,
                                   rtol=1e-4)


def test_named_backbone_run_keeps_no_base_copy(seg, tmp_path):
    """A backbone given by name is rebuilt from run.json (base + segmenter record)."""
    folder = tt.save_model(tiny_backbone(num_classes=4), tmp_path / "tiny")
    out = tmp_path / "run"
    r = tt.finetune(str(folder), f"seg:{seg}", _cfg("lora", out, task_options={"head": "linear4"}),
                    eval_data=f"seg:{seg}@val")
    base = read_json(out / "run.json")["base"]
    assert base["segmenter"] == {"num_classes": 3, "head": "linear4"}
    assert not (out / "base").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tt.load_model(str(out))(x), r.model.eval()(x))


def _break(seg: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(seg, bad)
    mask = bad / "annotations" / "validation" / "001.png"
    m = np.array(Image.open(mask))
    m[0, 0] = 9
    Image.fromarray(m, mode="L").save(mask)
    return bad


def test_bad_data_refused_before_anything_is_written(seg, tmp_path):
    bad = _break(seg, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(tt.TrimtuneError, match=r"001\.png has label 9"):
        tt.finetune(tiny_backbone(), f"seg:{bad}", _cfg("lora", out), eval_data=f"seg:{bad}@val")
    assert not out.exists()
    with pytest.raises(tt.TrimtuneError, match="is not segmentation data"):
        tt.finetune(tiny_backbone(), "synthetic:classes=3,n=16,size=32", _cfg("lora", out))
    with pytest.raises(tt.TrimtuneError, match="unknown task"):
        FinetuneConfig(task="detection")
    with pytest.raises(tt.TrimtuneError, match="takes no option"):
        FinetuneConfig(task="segmentation", task_options={"crop": 1})


def test_cli_segmentation_and_bad_input(seg, tmp_path, capsys):
    folder = tt.save_model(tiny_backbone(num_classes=4), tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["finetune", "--model", folder, "--task", "segmentation", "--method", "snella",
            "--data", f"seg:{seg}", "--val-data", f"seg:{seg}@val", "--test-data",
            f"seg:{seg}@test", "--r", "4", "--epochs", "1", "--batch-size", "8",
            "--no-progress", "--out", out]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "best validation mIoU" in printed and "test mIoU" in printed
    assert isinstance(tt.load_model(str(out)), SegmentationModel)
    test_miou = read_json(out / "results.json")["test_miou"]
    assert main(["evaluate", "--model", str(out), "--data", f"seg:{seg}", "--split", "test"]) == 0
    assert "mIoU" in capsys.readouterr().out and (out / "masks_test.png").is_file()
    assert read_json(out / "eval_test.json")["miou"] == pytest.approx(test_miou)
    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(merged), "--data", f"seg:{seg}", "--split",
                 "test"]) == 0
    assert read_json(merged / "eval_test.json")["miou"] == pytest.approx(test_miou, abs=1e-6)
    bad = _break(seg, tmp_path)
    argv[argv.index(f"seg:{seg}@val")] = f"seg:{bad}@val"
    argv[-1] = tmp_path / "run2"
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "001.png has label 9" in err
    assert not (tmp_path / "run2").exists()
