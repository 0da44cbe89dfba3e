"""bench_segmentation's report: paired differences, goals and the contention line, on fake
rows (the benchmark itself runs DINOv2-S, which the tests never load)."""

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_segmentation",
                                                  BENCH / "bench_segmentation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_pairs_seeds_and_states_goals():
    b = _load()
    miou = {("original", "linear"): [0.30, 0.32], ("original", "lora"): [0.35, 0.36],
            ("original", "snella"): [0.34, 0.31], ("compressed", "snella"): [0.33, 0.28]}
    rows = [{"backbone": bb, "method": m, "seed": s, "lr": 1e-3, "test_miou": v,
             "test_pixel_acc": 0.9, "trainable": 10, "seconds": 1.0, "val_miou": v}
            for (bb, m), vs in miou.items() for s, v in enumerate(vs)]
    mem = {"lora": [{"peak_bytes": 100 * b.MB, "step_s": 1.0}],
           "snella": [{"peak_bytes": 98 * b.MB, "step_s": 1.2}]}
    a = argparse.Namespace(size=112, epochs=3, batch_size=8, rank=8, sparsity=0.5, seeds=[0, 1],
                           train=160, val=40, test=100, head_init="probe", lr={},
                           methods=["linear", "lora", "snella"], warmup_epochs=0.5)
    cpu = {"other_cores_mean": 1.2, "other_cores_max": 1.6, "contended": True, "seconds": 60}
    md = b.report(rows, mem, {}, cpu, {"versions": {}}, a, done=True)
    assert "| snella@original - linear@original | +1.50 | 3.54 | +4.00, -1.00 | 2 |" in md
    assert "| snella@compressed - snella@original | -2.00 | 1.41 | -1.00, -3.00 | 2 |" in md
    assert "snella beats the linear head" in md and "+1.50 **met**" in md
    assert "within 2 mIoU of original + snella (mean paired difference >= -2): -2.00 **met**" in md
    assert "0.98x (98 vs 100 MB) **met**" in md
    assert "**CONTENDED** machine" in md
    assert "| original | lora | 0.001 | 35.50 ± 0.71 |" in md
