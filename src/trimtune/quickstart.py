"""`trimtune quickstart`: the whole pipeline on the built-in default, on real weights and images.

DINOv2 ViT-S/14 (offline zoo) -> compress (c = 2) -> short distillation on unlabeled images
-> SNELLA fine-tuning on Fashion-MNIST 1k-shot -> merge -> evaluate on the test set, ending
with one table (parameters, FLOPs, CPU latency, training memory, test accuracy) and a
markdown summary + plots in the run folder. About 10 minutes on 2 CPU cores by default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (atomic_path, check_writable, holds_run, refuse_existing, run_folder,
                         write_json)
from .data import build_transform, load_dataset
from .errors import RunInterrupted, TrimtuneError
from .lowrank import DistillConfig, compress
from .measure import count_flops, count_parameters, evaluate_model, latency
from .measure.memory import measure_subprocess
from .measure.plots import plot_bars
from .models import create_backbone
from .data import split_spec
from .runs import merge, save_model
from .tasks import FinetuneConfig, distill, finetune
from .train import TrainConfig


#: the two fine-tuning runs, by row label -> their sub-folder of --out
RUNS = {"original + snella": "original_snella", "compressed + snella": "compressed_snella"}
#: what an earlier quickstart leaves in --out
MARKERS = ("distill", "distilled", *RUNS.values(), "summary.json", "summary.md")


def _subset(ds, n: int, seed: int):
    if not n or n >= len(ds):
        return ds
    targets = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    per = max(1, n // len(classes))
    idx = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per] for c in classes])
    sub = torch.utils.data.Subset(ds, np.sort(idx).tolist())
    sub.num_classes, sub.classes = ds.num_classes, getattr(ds, "classes", None)
    sub.targets = targets[np.sort(idx)].tolist()
    return sub


@torch.inference_mode()
def _features(model, ds, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    feats, labels = [], []
    for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size):
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels)


LATENCY_ROUNDS = 3


def linear_probe(model, train_ds, seed: int = 0):
    """Logistic regression on frozen pre-logit features; installed as the model's head."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    x, y = _features(model, train_ds)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=2000, C=0.5, random_state=seed).fit(scaler.transform(x), y)
    w = clf.coef_ / scaler.scale_[None]
    b = clf.intercept_ - (w * scaler.mean_[None]).sum(1)
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        model.get_classifier().bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return model


@dataclass(frozen=True)
class QuickstartSettings:
    """Everything one quickstart reads (the keywords of :func:`quickstart`, with its defaults);
    recorded in ``summary.json`` under ``args``."""

    out: str = "runs/quickstart"
    model: str = "dinov2_small.imgfocus"
    weights: str | None = None
    img_size: int = 112
    data: str = "fashion-mnist:1k"
    test_data: str | None = None  # default: the test split of data's dataset
    test_images: int = 2000  # 0: all
    distill_data: str = "fashion-mnist"
    distill_images: int = 2048
    distill_epochs: int = 1
    ratio: float = 2.0
    init: str = "whiten"  # svd | whiten | asvd
    calib_images: int = 256
    epochs: int = 2
    lr: float = 2e-3
    r: int = 8
    target_sparsity: float = 0.5
    batch_size: int = 32
    seed: int = 0
    head_init: str = "probe"  # probe | random
    memory: bool = True  # measure the training-memory column (about a minute)
    overwrite: bool = False
    progress: bool = True


def quickstart(args: argparse.Namespace | None = None, /, **settings: Any) -> dict:
    """The pipeline of the module docstring into ``out``; keywords and defaults are
    :class:`QuickstartSettings`' (``quickstart(out="runs/qs", epochs=1)``). A non-empty ``out``
    is refused before anything loads unless ``overwrite``, which writes beside it and swaps in
    only once the whole quickstart finished (:func:`trimtune.checkpoint.run_folder`).

    ``args``: the CLI's parsed flags, the same as :func:`quickstart_from_args` (kept for the
    command line of this release)."""
    if args is not None:
        return quickstart_from_args(args)
    q = QuickstartSettings(**settings)
    t_start = time.time()
    out = Path(q.out)
    if holds_run(out) and not q.overwrite:
        raise refuse_existing(out, "quickstart", resume=False, markers=MARKERS)
    check_writable(out)
    try:
        with run_folder(out, overwrite=q.overwrite, what="quickstart") as work:
            result = _pipeline(q, work, t_start)
    except RunInterrupted as e:
        if q.overwrite:  # run_folder said it: the previous quickstart is untouched
            raise
        raise RunInterrupted(f"interrupted by {signal.Signals(e.signum).name}; the quickstart "
                             f"in {out} is incomplete (quickstart has no --resume): run it again "
                             "with --overwrite", e.signum) from None
    print(f"summary, plots and runs in {out}/")
    return result


def quickstart_from_args(a: argparse.Namespace) -> dict:
    """The thin adapter the CLI calls: ``trimtune quickstart``'s flags as :func:`quickstart`'s
    keywords (``--r`` -> ``r``, ``--sparsity`` -> ``target_sparsity``, ``--no-memory`` /
    ``--no-progress`` -> ``memory`` / ``progress``)."""
    renamed = {"rank": "r", "sparsity": "target_sparsity"}
    names = {f.name for f in dataclasses.fields(QuickstartSettings)}
    kw = {renamed.get(k, k): v for k, v in vars(a).items()}
    kw["memory"] = not kw.pop("no_memory", False)
    kw["progress"] = not kw.pop("no_progress", False)
    return quickstart(**{k: v for k, v in kw.items() if k in names})


def _pipeline(a: QuickstartSettings, out: Path, t_start: float) -> dict:
    """The quickstart, written into ``out`` (``a.out`` itself or its staging sibling)."""
    progress = a.progress
    torch.manual_seed(a.seed)
    data_name, _ = split_spec(a.data, "train")
    test_spec = a.test_data or f"{data_name}@test"  # a K-shot set's test = the official one
    probe = load_dataset(data_name, "train", seed=a.seed)
    nc = probe.num_classes

    def stage(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    stage(f"backbone {a.model} at {a.img_size}px, {nc} classes")
    teacher = create_backbone(a.model, weights=a.weights, num_classes=nc, img_size=a.img_size,
                              seed=a.seed)
    tf = build_transform(teacher, train=False)
    train_ds = load_dataset(data_name, "train", transform=tf, seed=a.seed)
    test_name, test_split = split_spec(test_spec, "test")
    test_ds = _subset(load_dataset(test_name, test_split, transform=tf, seed=a.seed),
                      a.test_images, a.seed)

    rows: dict[str, dict] = {}

    stage("1/5 linear probe on the original backbone")
    lp = linear_probe(copy.deepcopy(teacher), train_ds, a.seed)
    rows["original + linear probe"] = {"model": lp,
                                       "acc": evaluate_model(lp, test_ds, progress=progress).top1,
                                       "method": "linear"}

    init = a.init
    stage(f"2/5 compress (PELA, c = {a.ratio}, init {init})")
    calib = {} if init == "svd" else dict(init=init, calib=a.distill_data,
                                          calib_images=a.calib_images)
    student = compress(teacher, ratio=a.ratio, **calib)

    stage(f"3/5 distill {a.distill_images} unlabeled images x {a.distill_epochs} epoch(s)")
    dname, dsplit = split_spec(a.distill_data, "train")
    distill_ds = _subset(load_dataset(dname, dsplit, transform=tf, seed=a.seed),
                         a.distill_images, a.seed + 1)
    dcfg = DistillConfig(train=TrainConfig(epochs=a.distill_epochs, lr=5e-5, min_lr=1e-6,
                                           warmup_epochs=0.2,
                                           batch_size=a.batch_size, weight_decay=0.05,
                                           seed=a.seed, out_dir=str(out / "distill"),
                                           resume=False, progress=progress),
                         ce_weight=0.0)  # unlabeled: only the 1k-shot labels are ever used
    distill(student, teacher, distill_ds, dcfg)
    save_model(student, out / "distilled")

    ft = dict(method="snella", r=a.r, target_sparsity=a.target_sparsity)
    for label, base in (("original + snella", teacher), ("compressed + snella", student)):
        stage(f"{4 if 'original' in label else 5}/5 SNELLA fine-tuning: {label}")
        run = out / RUNS[label]
        base = copy.deepcopy(base)
        if a.head_init == "probe":
            linear_probe(base, train_ds, a.seed)
        tc = TrainConfig(epochs=a.epochs, lr=a.lr, min_lr=1e-5, batch_size=a.batch_size,
                         warmup_epochs=0.5, weight_decay=1e-4, seed=a.seed, out_dir=str(run),
                         resume=False, progress=progress)
        r = finetune(base, train_ds, FinetuneConfig(**ft, train=tc),
                     base_spec={"model": a.model, "num_classes": nc, "img_size": a.img_size}
                     if "original" in label else None)
        x = next(iter(torch.utils.data.DataLoader(test_ds, batch_size=64)))[0]
        with torch.no_grad():
            adapted = r.model.eval()(x)
        merged = merge(r.model)
        with torch.no_grad():
            gap = (merged.eval()(x) - adapted).abs().max().item()
        if gap > 1e-3:
            raise TrimtuneError(f"merged logits differ from the adapted model's by {gap:.2e}: "
                                "please report this bug")
        stage(f"merged (max logit change {gap:.1e}); evaluating on {len(test_ds)} test images")
        acc_merged = evaluate_model(merged, test_ds, progress=progress).top1
        save_model(merged, run / "merged")
        rows[label] = {"model": merged, "acc": acc_merged, "method": "snella"}

    stage("measuring parameters, FLOPs, latency" +
          ("" if not a.memory else ", training memory"))
    # latency side by side: rounds over the models, each model's best round (a burst of other
    # work, e.g. a compile worker finishing, then slows one round, not one model)
    best: dict[str, float] = {}
    for _ in range(LATENCY_ROUNDS):
        for label, r in rows.items():
            sec = latency(r["model"], batch_size=1, reps=10, warmup=3)["seconds"]
            best[label] = min(best.get(label, sec), sec)
    table = []
    for label, r in rows.items():
        m = r["model"]
        row = {"configuration": label, "params_M": count_parameters(m) / 1e6,
               "gflops": count_flops(m) / 1e9, "latency_ms": best[label] * 1e3,
               "test_top1": r["acc"]}
        if a.memory:
            src = str(out / "distilled") if "compressed" in label else a.model
            mem = measure_subprocess("trimtune.train_step:build_train_step", dict(
                model=src, weights=a.weights, img_size=a.img_size, num_classes=nc,
                method=r["method"], r=a.r, batch_size=a.batch_size))
            row["train_mem_MB"] = mem["peak_bytes"] / 2**20
        table.append(row)
    elapsed = time.time() - t_start
    md = _markdown(table, a, elapsed, len(test_ds), test_spec)
    print("\n" + md)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(md)
    write_json(out / "summary.json", {"rows": table, "args": dataclasses.asdict(a),
                                      "seconds": elapsed})
    plot_bars({"test top-1 (%)": {r["configuration"]: 100 * r["test_top1"] for r in table},
               "params (M)": {r["configuration"]: r["params_M"] for r in table},
               "GFLOPs x10": {r["configuration"]: 10 * r["gflops"] for r in table}},
              out / "summary.png", ylabel="value", title="trimtune quickstart")
    return {"rows": table, "seconds": elapsed}


def _markdown(table: list[dict], a: QuickstartSettings, elapsed: float, n_test: int,
              test_spec: str) -> str:
    cols = ["configuration", "params_M", "gflops", "latency_ms", "train_mem_MB", "test_top1"]
    heads = {"configuration": "configuration", "params_M": "params (M)", "gflops": "GFLOPs/img",
             "latency_ms": "CPU latency bs1 (ms)", "train_mem_MB": "train mem (MB)",
             "test_top1": "test top-1"}
    cols = [c for c in cols if c in table[0]]
    lines = [f"# trimtune quickstart: {a.model} at {a.img_size}px on {a.data}", "",
             "| " + " | ".join(heads[c] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in table:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(v if isinstance(v, str) else f"{v:.4f}" if c == "test_top1"
                         else f"{v:.2f}" if c != "train_mem_MB" else f"{v:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test set: {n_test} images of {test_spec}. Fine-tuning: SNELLA r={a.r}, "
              f"target sparsity {a.target_sparsity}, {a.epochs} epochs, lr {a.lr}, batch "
              f"{a.batch_size}. Compression: c = {a.ratio}, factor init "
              f"{a.init}. Distillation: {a.distill_images} unlabeled "
              f"images x {a.distill_epochs} epoch(s). CPU latency: batch 1, the best of "
              f"{LATENCY_ROUNDS} rounds over the models. Training memory: peak RSS increase of one "
              f"training step at batch {a.batch_size} in a fresh process (CPU). "
              f"Total time {elapsed / 60:.1f} min on {torch.get_num_threads()} threads.", ""]
    gains = join_gains(table)
    if gains:
        lines += ["## What the join gains", "", gains, ""]
    return "\n".join(lines)


def join_gains(table: list[dict]) -> str:
    """One paragraph: compressed + snella against original + snella, from the summary rows
    (params, FLOPs, latency, training memory when measured, test top-1); "" without both."""
    rows = {r["configuration"]: r for r in table}
    o, c = rows.get("original + snella"), rows.get("compressed + snella")
    if o is None or c is None:
        return ""
    parts = [f"{o['params_M'] / c['params_M']:.2f}x fewer parameters "
             f"({o['params_M']:.2f}M -> {c['params_M']:.2f}M)",
             f"{o['gflops'] / c['gflops']:.2f}x fewer FLOPs",
             f"{o['latency_ms'] / c['latency_ms']:.2f}x the CPU inference speed (batch 1)"]
    if "train_mem_MB" in o and "train_mem_MB" in c:
        ratio = c["train_mem_MB"] / o["train_mem_MB"]
        parts.append(f"{ratio:.2f}x the training memory ({o['train_mem_MB']:.0f} -> "
                     f"{c['train_mem_MB']:.0f} MB; {'less' if ratio < 1 else 'MORE'})")
    diff = 100 * (c["test_top1"] - o["test_top1"])
    return ("Compressed + SNELLA against original + SNELLA (same data, budget and seed): "
            + ", ".join(parts) + f", at {diff:+.2f} points of test top-1 "
            f"({100 * o['test_top1']:.2f}% -> {100 * c['test_top1']:.2f}%; one seed).")
