"""Same seed, same bits on the real default path: the zoo's DINOv2-S (real weights; its new head
made by create_backbone in each process after a random global RNG state), the built-in
Fashion-MNIST, SNELLA with its mask competing from the first step, two fresh processes each,
with the compiled SNELL path on and off, at 2 threads: the adapter files are byte-identical. And
the one setting that changes the bits (the thread count) is recorded in run.json and gives other
bits, as README says."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import sys, torch, trimtune as tt
out, threads = sys.argv[1], int(sys.argv[2])
cfg = tt.FinetuneConfig(method="snella", rank=8, init_sparsity=0.7, train=tt.TrainConfig(
    lr=1e-2, epochs=1, max_steps=3, batch_size=16, seed=1, out_dir=out, progress=False,
    threads=threads))
torch.seed()  # a random global RNG state: create_backbone draws the new head from its own seed
model = tt.create_backbone("dinov2_small.imgfocus", num_classes=10, img_size=56)
tt.finetune(model, "fashion-mnist:1k", cfg)
"""


def _run(out: Path, compile_: str, threads: int = 2) -> dict[str, str]:
    env = {**os.environ, "TRIMTUNE_COMPILE": compile_, "PYTHONHASHSEED": "random"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(threads)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "adapter").iterdir())}


def test_same_seed_same_bytes_on_the_real_path(tmp_path):
    pytest.importorskip("onnx")
    from trimtune.data.builtin import FASHION_MNIST_DIR
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    for mode in ("0", "1"):  # eager, then the compiled path (Inductor; its cache is on disk)
        a = _run(tmp_path / f"a{mode}", mode)
        b = _run(tmp_path / f"b{mode}", mode)
        assert a == b, f"TRIMTUNE_COMPILE={mode}: same seed, different adapter bytes"
        assert "adapter_model.safetensors" in a
    run = json.loads((tmp_path / "a0" / "run.json").read_text())
    assert run["numerics"]["threads"] == 2 and run["numerics"]["compile"] == "0"
    # the documented exception: another thread count, other bits (recorded, so it can be replayed)
    one = _run(tmp_path / "one", "0", threads=1)
    assert one["adapter_model.safetensors"] != a["adapter_model.safetensors"]
    assert json.loads((tmp_path / "one" / "run.json").read_text())["numerics"]["threads"] == 1
