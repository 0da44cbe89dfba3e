"""Fine-tuning quality on real weights and real images (issue 6): SNELLA vs the baselines.

DINOv2 ViT-S/14 (offline zoo, ``dinov2_small.imgfocus``) at 112 px on Fashion-MNIST 1k-shot,
tested on the full 10k test set, for ``linear``, ``lora``, ``snell``, ``snella`` and ``full``
(rank 8 for the low-rank methods), each through ``tt.finetune``.

Protocol (identical for every method; the test set is never used for any choice):

1. learning-rate search: for each lr of the method's 2-value grid, train ``--epochs`` epochs on
   ``fashion-mnist:1k@train800`` and measure ``@val`` (the held-out 200 of the 1k set) at
   every epoch; the (lr, epoch) with the best val accuracy is selected (``tt.finetune`` keeps
   the best-val weights).
2. test: the selected model (default, ``--final-on train800``) or, with ``--final-on train``,
   a re-run with the selected lr for the same epochs on the full 1k set (VTAB protocol, ~1.4x
   the compute) is merged (``tt.merge``: plain weights, no adapter overhead) and evaluated on
   the 10k test images.

Run (defaults fit ~35 CPU minutes on 2 threads):
    .venv/bin/python benchmarks/bench_quality.py
    .venv/bin/python benchmarks/bench_quality.py --epochs 10 --final-on train --img-size 224
Writes benchmarks/results/quality_<tag>.{md,json,png}; partial JSON after every configuration;
``--resume`` skips the methods already complete in that JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, Timer, log, machine_info, machine_markdown, md_table,  # noqa: E402
                     write_results)

import trimtune as tt  # noqa: E402
from trimtune.data import stratified_choice  # noqa: E402
from trimtune.measure.plots import plot_bars  # noqa: E402

DEFAULT_LRS = {  # 2-value grids, the usual ranges of each method (AdamW, batch 32)
    "linear": (3e-3, 1e-2),
    "lora": (1e-3, 3e-3),
    "snell": (1e-3, 3e-3),
    "snella": (1e-3, 3e-3),
    "full": (3e-5, 1e-4),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--data", default="fashion-mnist:1k")
    ap.add_argument("--test-data", default="fashion-mnist@test")
    ap.add_argument("--test-images", type=int, default=0,
                    help="cap the test set (stratified, seeded); 0 = all 10k")
    ap.add_argument("--methods", default="linear,lora,snell,snella,full")
    ap.add_argument("--lrs", default="", help='override grids, JSON: {"lora": [1e-3, 3e-3]}')
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.7, help="snell / snella sparsity")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--final-on", choices=("train800", "train"), default="train800",
                    help="test the selected train800 model, or retrain on the full 1k set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_quality")
    ap.add_argument("--tag", default="cpu", help="results file: quality_<tag>.*")
    ap.add_argument("--resume", action="store_true",
                    help="keep methods already complete in quality_<tag>.json")
    return ap.parse_args(argv)


class Pretransformed(torch.utils.data.Dataset):
    """A dataset's transformed images, computed once and kept as float16 (N, 3, H, W): the
    five test evaluations then skip the per-image PIL -> tensor -> normalise work."""

    def __init__(self, ds, batch_size: int = 256) -> None:
        xs, ys = [], []
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            xs.append(x.half())
            ys.append(torch.as_tensor(y))
        self.x, self.y = torch.cat(xs), torch.cat(ys)
        self.num_classes, self.classes = ds.num_classes, getattr(ds, "classes", None)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].float(), int(self.y[i])


def train_cfg(a, lr: float, out_dir: Path) -> tt.TrainConfig:
    return tt.TrainConfig(epochs=a.epochs, lr=lr, min_lr=1e-6, batch_size=a.batch_size,
                          warmup_epochs=0.5, weight_decay=1e-4, seed=a.seed,
                          out_dir=str(out_dir), resume=False, progress=False, log_every=10)


def run_method(method: str, base: torch.nn.Module, a, lrs, test_ds) -> dict:
    """lr search on train800/val, then merge + test of the selected configuration."""
    name, _, _ = a.data.partition("@")
    fcfg = dict(method=method, rank=a.rank, sparsity=a.sparsity)
    out: dict = {"lrs": list(lrs), "search": [], "epochs": a.epochs}
    best = None
    for lr in lrs:
        with Timer() as t:
            r = tt.finetune(copy.deepcopy(base), f"{name}@train800",
                            tt.FinetuneConfig(**fcfg, train=train_cfg(
                                a, lr, Path(a.work) / f"{method}_lr{lr:g}")),
                            eval_data=f"{name}@val")
        val_curve = [h.get("val_acc") for h in r.history if "val_acc" in h]
        row = {"lr": lr, "best_val_acc": r.best["val_acc"], "val_curve": val_curve,
               "wall_s": t.seconds}
        out["search"].append(row)
        log(f"  {method} lr={lr:g}: best val {row['best_val_acc']:.4f} "
            f"(curve {val_curve}) in {t.seconds:.0f}s")
        if best is None or row["best_val_acc"] > best[0]["best_val_acc"]:
            best = (row, r.model)
        else:
            del r
    row, model = best
    out["selected_lr"], out["val_acc"] = row["lr"], row["best_val_acc"]
    if a.final_on == "train":
        with Timer() as t:
            r = tt.finetune(copy.deepcopy(base), f"{name}@train",
                            tt.FinetuneConfig(**fcfg, train=train_cfg(
                                a, row["lr"], Path(a.work) / f"{method}_final")))
        model = r.model
        out["final_wall_s"] = t.seconds
    s = tt.trainable_summary(model)
    out["trainable_params"], out["trainable_percent"] = int(s["trainable"]), s["percent"]
    with Timer() as t:
        merged = tt.merge(model)
        out["test_top1"] = tt.evaluate_model(merged, test_ds, progress=False).top1
    out["test_wall_s"] = t.seconds
    out["train_wall_s"] = sum(r["wall_s"] for r in out["search"]) + out.get("final_wall_s", 0.0)
    log(f"  {method}: lr {row['lr']:g} selected on val; test top-1 {out['test_top1']:.4f}")
    return out


def report(a, info: dict, results: dict) -> tuple[str, dict]:
    header = ["method", "trainable params", "lr grid", "selected lr (val)", "best val",
              "test top-1 (%)", "train wall (s)", "test wall (s)"]
    rows = [[m, f"{r['trainable_params']:,} ({r['trainable_percent']:.2f}%)",
             ", ".join(f"{x:g}" for x in r["lrs"]), f"{r['selected_lr']:g}",
             f"{100 * r['val_acc']:.1f}", f"{100 * r['test_top1']:.2f}",
             f"{r['train_wall_s']:.0f}", f"{r['test_wall_s']:.0f}"]
            for m, r in results.items()]
    search = [[m, f"{s['lr']:g}", " / ".join(f"{100 * v:.1f}" for v in s["val_curve"]),
               f"{s['wall_s']:.0f}"] for m, r in results.items() for s in r["search"]]
    total = sum(r["train_wall_s"] + r["test_wall_s"] for r in results.values())
    goals = []
    if {"snella", "lora"} <= results.keys():
        d = results["snella"]["test_top1"] - results["lora"]["test_top1"]
        goals.append(f"- snella - lora: {100 * d:+.2f} points (goal >= 0: "
                     f"{'met' if d >= 0 else 'missed'})")
    if {"snella", "full"} <= results.keys():
        d = results["snella"]["test_top1"] - results["full"]["test_top1"]
        goals.append(f"- snella - full: {100 * d:+.2f} points (goal within 1 point: "
                     f"{'met' if d >= -0.01 else 'missed'})")
    final = ("the selected model (best val epoch of the best lr, trained on train800)"
             if a.final_on == "train800" else
             "a re-run of the selected lr on the full 1k set (last epoch)")
    md = [f"# Fine-tuning quality: {a.model} at {a.img_size}px, {a.data} -> {a.test_data}", "",
          f"Each method: {a.epochs} epochs per run, batch {a.batch_size}, AdamW (wd 1e-4), "
          "0.5-epoch warm-up then cosine to 1e-6; rank "
          f"{a.rank} for lora / snell / snella, sparsity {a.sparsity} for snell / snella "
          "(snella: target of its schedule). lr chosen on `@val` (200 held-out of the 1k set) "
          f"after training on `@train800`; tested: {final}, merged (`tt.merge`), on "
          f"{results and next(iter(results.values())).get('n_test', '?')} test images. "
          "The test set is never used for selection.", "",
          md_table(header, rows), "", *goals, "",
          f"Total compute: {total / 60:.1f} min wall on "
          + (f"one {info['gpu'][0]['name']}" if info.get("gpu") else
             f"{info['torch_threads']} CPU threads (shared with other jobs: wall times are "
             "upper bounds)") + ".", "",
          "## lr search (val accuracy per epoch, %)", "",
          md_table(["method", "lr", "val per epoch", "wall (s)"], search), "",
          "## Machine", "", machine_markdown(info), ""]
    groups = {"test top-1 (%)": {m: 100 * r["test_top1"] for m, r in results.items()},
              "val (%)": {m: 100 * r["val_acc"] for m, r in results.items()}}
    return "\n".join(md), groups


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    grids = dict(DEFAULT_LRS)
    if a.lrs:
        grids.update({k: tuple(v) for k, v in json.loads(a.lrs).items()})
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in grids]
    if unknown:
        raise tt.TrimtuneError(f"no lr grid for {unknown}: pass --lrs '{{\"{unknown[0]}\": "
                               "[1e-3, 3e-3]}'")
    info = machine_info()
    results: dict[str, dict] = {}
    prev = RESULTS / f"quality_{a.tag}.json"
    if a.resume and prev.is_file():
        results = {m: r for m, r in json.loads(prev.read_text()).get("results", {}).items()
                   if m in methods}
        log(f"resuming: {sorted(results)} already done")

    log(f"backbone {a.model} at {a.img_size}px")
    base = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size)
    tname, _, tsplit = a.test_data.partition("@")
    test_ds = tt.load_dataset(tname, tsplit or "test", seed=a.seed,
                              transform=tt.build_transform(base, train=False))
    if a.test_images and a.test_images < len(test_ds):
        test_ds = test_ds.subset(stratified_choice(test_ds.targets, a.test_images, a.seed))
    with Timer() as t:
        test_ds = Pretransformed(test_ds)
    log(f"test set: {len(test_ds)} images transformed once in {t.seconds:.0f}s")

    def save(final: bool) -> None:
        md, groups = report(a, info, results)
        data = {"args": vars(a), "machine": info, "results": results, "complete": final}
        write_results(f"quality_{a.tag}", md, data,
                      figure=(lambda p: plot_bars(groups, p, ylabel="accuracy (%)",
                                                  title=f"{a.data}, {a.img_size}px"))
                      if results else None)

    for m in methods:
        if m in results:
            continue
        log(f"{m}: lr search over {grids[m]}, {a.epochs} epochs each")
        results[m] = run_method(m, base, a, grids[m], test_ds)
        results[m]["n_test"] = len(test_ds)
        save(final=False)
    save(final=True)
    print("\n" + report(a, info, results)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
