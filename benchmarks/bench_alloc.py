"""Is the SNELLA allocation on a compressed model degenerate? (issue 15, a short run)

DINOv2 ViT-S/14 (offline zoo) at 112 px, original and PELA c = 2 (plain SVD), SNELLA r = 8 to
a target sparsity of 0.5 (the quickstart's settings) on a short Fashion-MNIST run, with the
allocator's unit scores as the paper has them (mean-based) and ``size_aware`` (times the unit
size). Targets on the compressed model: the default (one update per factorised layer, on
``.second``) and both factors (the earlier default).

Reported per run: how many units end (nearly) fully zeroed (sparsity > 0.99; the allocator
keeps at least one entry) or dense (< 0.01), and the spread of the per-unit sparsities.

Run (a few minutes on 2 CPU cores):
    .venv/bin/python benchmarks/bench_alloc.py
Writes benchmarks/results/alloc_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, finish, log, machine_info, md_table  # noqa: E402
from bench_train import FACTOR_TARGETS  # noqa: E402

import trimtune as tt  # noqa: E402
from trimtune.tuners import iter_units  # noqa: E402


CONFIGS = {"original": "original", "c2": "c=2, one factor (.second)",
           "c2-both": "c=2, both factors"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--data", default="fashion-mnist:200")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5, help="SNELLA target sparsity")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="models / targets to run (each with mean and size-aware scores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_alloc", help="run folders")
    ap.add_argument("--tag", default="cpu")
    return ap.parse_args(argv)


def summary(sp: dict[str, float]) -> dict:
    v = sorted(sp.values())
    return {"units": len(v), "zeroed": sum(s > 0.99 for s in v), "dense": sum(s < 0.01 for s in v),
            "min": v[0], "median": statistics.median(v), "max": v[-1],
            "stdev": statistics.pstdev(v)}


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    info = machine_info()
    base = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size)
    comp = tt.compress(base, ratio=2.0)
    runs = {}
    models = {"original": (base, None), "c2": (comp, None),
              "c2-both": (comp, FACTOR_TARGETS["both"])}
    for key in a.configs:
        (model, targets), model_name = models[key], CONFIGS[key]
        for size_aware in (False, True):
            label = f"{model_name}, {'size-aware' if size_aware else 'mean'} scores"
            kw = {"size_aware": size_aware}
            if targets:
                kw["target_modules"] = targets
            cfg = tt.FinetuneConfig(
                method="snella", r=a.rank, target_sparsity=a.sparsity, method_kwargs=kw,
                train=tt.TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                     seed=a.seed, progress=False, overwrite=True,
                                     out_dir=f"{a.work}/{len(runs)}"))
            with Timer() as t:
                res = tt.finetune(copy.deepcopy(model), a.data, cfg)
            sp = {n: float(u.sparsity) for n, u in iter_units(res.model)}
            runs[label] = {"seconds": t.seconds, **summary(sp), "sparsity": sp}
            log(f"{label}: {summary(sp)} in {t.seconds:.0f}s")
    rows = [[k, r["units"], r["zeroed"], r["dense"], f"{r['min']:.3f}", f"{r['median']:.3f}",
             f"{r['max']:.3f}", f"{r['stdev']:.3f}"] for k, r in runs.items()]
    md = [f"# SNELLA allocation on original vs compressed {a.model} ({a.img_size}px)", "",
          f"SNELLA r = {a.rank}, target sparsity {a.sparsity}, `{a.data}`, {a.epochs} epochs of "
          f"batch {a.batch_size}, lr {a.lr}, seed {a.seed}; the allocator's final per-unit "
          "sparsities. zeroed: sparsity > 0.99 (the allocator keeps one entry); dense: < 0.01.",
          "", md_table(["run", "units", "zeroed", "dense", "min", "median", "max", "stdev"],
                       rows), "",
          "A short run on 2 CPU cores shared with other engineers' jobs."]
    return finish(f"alloc_{a.tag}", md, info, {"args": vars(a), "runs": runs})


if __name__ == "__main__":
    raise SystemExit(main())
