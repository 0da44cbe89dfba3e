"""`trimtune quickstart` end to end on a random vit_tiny (local weights file, 32 px) and the
built-in digits: it tests on the test split of --data's own dataset (not Fashion-MNIST), and a
second quickstart into the same --out is refused before anything loads unless --overwrite."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from trimtune.checkpoint import read_json
from trimtune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_quickstart_tests_on_the_data_own_test_split(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # 5.7M, at 32 px: fast
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    argv = ["quickstart", "--model", "vit_tiny_patch16_224", "--weights",
            str(tmp_path / "w.safetensors"), "--img-size", "32", "--data", "digits:40",
            "--distill-images", "16", "--test-images", "50", "--epochs", "1",
            "--batch-size", "8", "--r", "2", "--no-memory", "--no-progress",
            "--out", str(tmp_path / "qs")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "%|" not in err and "it/s" not in err, err[-2000:]  # --no-progress: no bar at all
    summary = (tmp_path / "qs" / "summary.md").read_text()
    assert "images of digits:40@test" in summary and "fashion" not in summary.lower()
    assert "## What the join gains" in summary and "fewer parameters" in summary
    args = read_json(tmp_path / "qs" / "summary.json")["args"]
    assert args["test_data"] is None  # the default follows --data

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "already holds a quickstart" in err and "--overwrite" in err


def test_join_gains_sentence():
    from trimtune.quickstart import join_gains

    row = dict(params_M=20.0, gflops=4.0, latency_ms=10.0, train_mem_MB=600.0, test_top1=0.8)
    table = [{"configuration": "original + snella", **row},
             {"configuration": "compressed + snella", **row, "params_M": 10.0, "gflops": 2.0,
              "latency_ms": 6.25, "train_mem_MB": 480.0, "test_top1": 0.79}]
    text = join_gains(table)
    assert "2.00x fewer parameters" in text and "1.60x the CPU inference speed" in text
    assert "0.80x the training memory (600 -> 480 MB; less)" in text and "-1.00 points" in text
    assert join_gains(table[:1]) == ""
