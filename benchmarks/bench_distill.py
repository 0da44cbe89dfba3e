"""PELA on real weights (issue 4): does distillation recover what SVD compression loses?

DINOv2 ViT-S/14 (offline zoo, ``dinov2_small.imgfocus``) at 112 px, compressed at c = 2, is
evaluated with frozen features (pre-logit CLS token) for three models:

* original       the pre-trained backbone
* svd            ``tt.compress(ratio=2)``: truncated SVD only
* svd+distill    the same, then ``tt.distill`` from the frozen original on unlabeled images
                 (Fashion-MNIST train + MNIST-5k train; labels are never used)

``--init whiten`` (or ``asvd``) replaces the plain SVD by the data-aware factorisation
(calibrated on unlabeled Fashion-MNIST train images); the rows are then ``whiten`` and
``whiten+distill``.

Two frozen-feature protocols on two real datasets:

* kNN: k nearest training features by cosine similarity, majority vote
* linear probe: ``LogisticRegression`` on standardised features (sklearn)

Datasets: Fashion-MNIST 1k-shot train (``fashion-mnist:1k``) / full 10k test, and sklearn
digits (1,347 train / 450 test). Features are extracted once per model and reused by both
protocols, and cached under ``--work`` so a killed run resumes without recomputing them.

Run (the defaults are the recipe of results/distill_cpu.md: 500 steps of 64 images, the
authors' per-block loss at lr 5e-5 with 50 warm-up steps; ~28 minutes of distillation on 2
CPU cores, ~35 s on an H100):
    .venv/bin/python benchmarks/bench_distill.py
    .venv/bin/python benchmarks/bench_distill.py --distill-images 4096 --distill-epochs 1 \
        --batch-size 32 --warmup-steps 10       # a 4-minute CPU check
Writes benchmarks/results/distill_<tag>.{md,json,png}; partial JSON after every model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, Timer, load_eval_sets, log, machine_info,  # noqa: E402
                     machine_markdown, md_table, params_m, write_results)

import trimtune as tt  # noqa: E402
from trimtune.checkpoint import read_safetensors, write_safetensors  # noqa: E402
from trimtune.data import stratified_choice  # noqa: E402
from trimtune.measure.plots import plot_bars  # noqa: E402

EVAL_SETS = {  # name: (train spec, train split, test spec, test split)
    "fashion-mnist 1k-shot": ("fashion-mnist:1k", "train", "fashion-mnist", "test"),
    "digits": ("digits", "train", "digits", "test"),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--ratio", type=float, default=2.0, help="PELA compression ratio c")
    ap.add_argument("--init", choices=("svd", "whiten", "asvd"), default="svd",
                    help="factorisation before distillation: PELA's plain SVD, SVD-LLM "
                         "whitening or ASVD scaling (the data-aware two are calibrated on "
                         "--calib-images unlabeled Fashion-MNIST train images)")
    ap.add_argument("--calib-images", type=int, default=256,
                    help="calibration images of --init whiten / asvd")
    ap.add_argument("--distill-images", type=int, default=24000,
                    help="unlabeled images asked for, half Fashion-MNIST train, half MNIST-5k "
                         "train (which has 4,000: the default gives 12,000 + 4,000)")
    ap.add_argument("--distill-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-weight", type=float, default=1.0, help="per-block feature MSE")
    ap.add_argument("--final-weight", type=float, default=0.0,
                    help="final-feature (forward_features, normed) MSE; 0 = off")
    ap.add_argument("--feature-norm", choices=("none", "layernorm"), default="none",
                    help="token features compared raw (authors) or layer-normalised")
    ap.add_argument("--augment", action="store_true",
                    help="distil on augmented images (timm's training transform: random "
                         "resized crop + flip, the fgvc protocol) instead of resized ones")
    ap.add_argument("--trainable", choices=("all", "factors"), default="all",
                    help="what the student trains: everything (authors) or the factors only")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=50,
                    help="linear warm-up steps (-1: min(20, a quarter epoch))")
    ap.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=0,
                    help="cap each test set (stratified, seeded); 0 = full test sets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where features are extracted (distillation runs where Accelerate "
                         "puts it: the GPU when there is one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_distill", help="feature cache + distill run")
    ap.add_argument("--tag", default="cpu", help="results file: distill_<tag>.*")
    return ap.parse_args(argv)


class Unlabeled(Dataset):
    """Wrap a labelled dataset and hide its labels: yields ``(image, -1)``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][0], -1


def distill_data(n: int, transform, seed: int) -> Dataset:
    """``n`` unlabeled images: ``n // 2`` Fashion-MNIST train, the rest MNIST-5k train (all of
    its 4,000 when fewer; the report gives the real count)."""
    parts = []
    for spec, k in (("fashion-mnist", n // 2), ("mnist-5k", n - n // 2)):
        ds = tt.load_dataset(spec, "train", transform=transform, seed=seed)
        if k < len(ds):
            ds = ds.subset(stratified_choice(ds.targets, k, seed))
        parts.append(Unlabeled(ds))
    return ConcatDataset(parts)


@torch.inference_mode()
def features(model: torch.nn.Module, ds: Dataset, batch_size: int = 128,
             device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit CLS features (N, C) and labels (N,) of ``ds``, computed on ``device``."""
    model.eval().to(device)
    feats, labels = [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def knn_accuracy(xtr, ytr, xte, yte, k: int) -> float:
    """Majority vote of the ``k`` nearest training features by cosine similarity."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def probe_accuracy(xtr, ytr, xte, yte, seed: int) -> float:
    """Logistic regression on standardised features (same settings as tt's linear_probe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=0.5, random_state=seed).fit(sc.transform(xtr), ytr)
    return float((clf.predict(sc.transform(xte)) == yte).mean())


def evaluate(label: str, model, sets: dict, a, work: Path) -> dict:
    """kNN and probe accuracy of ``model`` on every eval set; features cached in ``work``."""
    out = {}
    for name, (tr, te) in sets.items():
        cache = work / f"feats_{label}_{name.replace(' ', '_')}_{len(tr)}_{len(te)}.safetensors"
        if cache.is_file():
            f = read_safetensors(cache)
            xtr, ytr, xte, yte = (f[k].numpy() for k in ("xtr", "ytr", "xte", "yte"))
            log(f"  {label} / {name}: cached features")
        else:
            with Timer() as t:
                xtr, ytr = features(model, tr, device=a.device)
                xte, yte = features(model, te, device=a.device)
            log(f"  {label} / {name}: features of {len(tr)} + {len(te)} images in "
                f"{t.seconds:.0f}s")
            write_safetensors(cache, {"xtr": torch.from_numpy(xtr), "ytr": torch.from_numpy(ytr),
                                      "xte": torch.from_numpy(xte),
                                      "yte": torch.from_numpy(yte)})
        out[name] = {"knn": knn_accuracy(xtr, ytr, xte, yte, a.knn_k),
                     "probe": probe_accuracy(xtr, ytr, xte, yte, a.seed),
                     "n_train": len(ytr), "n_test": len(yte)}
        log(f"  {label} / {name}: kNN {out[name]['knn']:.4f}  probe {out[name]['probe']:.4f}")
    return out


def record(results: dict, timings: dict, key: str, label: str, model, sets: dict, a,
           work: Path, **extra) -> None:
    """:func:`evaluate` ``model`` (features cached as ``label``) into ``results[key]`` with
    its parameter count and ``extra`` fields; the wall time into ``timings``."""
    with Timer() as t:
        results[key] = {"params_M": params_m(model), **extra,
                        "acc": evaluate(label, model, sets, a, work)}
    timings[f"eval {key}"] = t.seconds


def report(a, info: dict, results: dict, timings: dict, distill_log: dict | None) -> tuple:
    models = list(results)
    header = ["model", "params (M)"] + [f"{n}: {p}" for n in EVAL_SETS for p in ("kNN", "probe")]
    rows = []
    for m in models:
        r = results[m]
        rows.append([m, f"{r['params_M']:.2f}"] + [
            f"{100 * r['acc'][n][p]:.2f}" if n in r.get("acc", {}) else "-"
            for n in EVAL_SETS for p in ("knn", "probe")])
    gaps = []
    if "original" in results and f"{a.init}+distill" in results:
        for n in EVAL_SETS:
            for p in ("knn", "probe"):
                o = results["original"].get("acc", {}).get(n, {}).get(p)
                d = results[f"{a.init}+distill"].get("acc", {}).get(n, {}).get(p)
                s = results.get(a.init, {}).get("acc", {}).get(n, {}).get(p)
                if o is not None and d is not None:
                    gaps.append([n, p, f"{100 * (d - o):+.2f}",
                                 f"{100 * (s - o):+.2f}" if s is not None else "-",
                                 "yes" if o - d <= 0.01 else "no"])
    md = [f"# PELA distillation on real weights: {a.model} at {a.img_size}px, c = {a.ratio}", "",
          "Frozen pre-logit CLS features; accuracy in %. kNN: k = "
          f"{a.knn_k}, cosine, majority vote. Probe: sklearn LogisticRegression (C = 0.5) on "
          "standardised features. Fashion-MNIST: 1k-shot train (`fashion-mnist:1k`, seed "
          f"{a.seed}), "
          + (f"{a.test_images} test images (stratified, seeded)" if a.test_images else
             "full 10k test")
          + "; digits: sklearn load_digits fixed 1,347 / 450 split.", "",
          md_table(header, rows), ""]
    if gaps:
        md += ["Gap to the original (points; goal: distilled within 1.0 point):", "",
               md_table(["dataset", "protocol", f"{a.init}+distill - original",
                         f"{a.init} - original", "within 1 pt"], gaps), ""]
    md += ["## Distillation", "",
           f"- data: {a.n_distill or a.distill_images} unlabeled images "
           f"({a.distill_parts or 'Fashion-MNIST train + MNIST-5k train'}; labels hidden), "
           f"{a.img_size}px, {a.distill_epochs} epoch(s), batch {a.batch_size}, AdamW lr "
           f"{a.lr} (warm-up {a.warmup_steps if a.warmup_steps >= 0 else 'auto'} "
           f"steps, cosine to 1e-6, wd {a.weight_decay}), trainable: "
           f"{'all student parameters' if a.trainable == 'all' else 'the low-rank factors'}",
           f"- loss: {a.block_weight} x per-block token MSE (all 12 blocks, prefix incl.) + "
           f"{a.final_weight} x final-feature MSE (`forward_features`, after the last norm: "
           "the tokens the CLS feature comes from); no logits, CE or weight-perturbation term; "
           f"token features {'raw' if a.feature_norm == 'none' else 'layer-normalised'}; "
           f"images {'augmented (random resized crop + flip)' if a.augment else 'resized'}",
           ]
    if distill_log:
        md.append(f"- final losses: {distill_log}")
    md += ["", "## Compute", "", md_table(["stage", "wall (s)"],
                                            [[k, f"{v:.0f}"] for k, v in timings.items()]), "",
           "## Machine", "", machine_markdown(info), ""]
    notes = RESULTS / f"distill_{a.tag}_notes.md"  # hand-written reading of the figures
    if notes.is_file():
        md += [notes.read_text().rstrip(), ""]
    groups = {f"{m}": {f"{n} {p}": 100 * results[m]["acc"][n][p]
                       for n in EVAL_SETS for p in ("knn", "probe")
                       if n in results[m].get("acc", {})} for m in models}
    return "\n".join(md), groups


def main(argv=None) -> int:
    a = parse_args(argv)
    a.n_distill, a.distill_parts = None, None  # filled in when the distillation data is built
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    distill_log: dict | None = None

    def save_partial(final: bool = False) -> None:
        md, groups = report(a, info, results, timings, distill_log)
        data = {"args": vars(a), "machine": info, "results": results, "timings_s": timings,
                "distill_final_losses": distill_log, "complete": final}
        fig = (lambda p: plot_bars(groups, p, ylabel="accuracy (%)",
                                   title=f"{a.model} {a.img_size}px, c={a.ratio}")) \
            if groups and any(groups.values()) else None
        write_results(f"distill_{a.tag}", md, data, figure=fig)

    log(f"teacher {a.model} at {a.img_size}px")
    teacher = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size)
    tf = tt.build_transform(teacher, train=False)
    sets = load_eval_sets(teacher, EVAL_SETS, a.test_images, a.seed)
    record(results, timings, "original", "original", teacher, sets, a, work)
    save_partial()

    calib = {}
    if a.init != "svd":  # unlabeled Fashion-MNIST train images, a draw of their own
        calib = dict(init=a.init, calib_images=a.calib_images,
                     calib=distill_data(2 * a.calib_images, tf, a.seed + 2).datasets[0])
    with Timer() as t:
        student = tt.compress(teacher, ratio=a.ratio, **calib)
    timings["compress"] = t.seconds
    log(f"compressed c={a.ratio} ({a.init}): {params_m(teacher):.2f}M -> "
        f"{params_m(student):.2f}M params in {t.seconds:.1f}s")
    label = "svd" if a.init == "svd" else f"{a.init}{a.calib_images}"  # feature cache name
    init_tag = "" if a.init == "svd" else f"_{label}"
    record(results, timings, a.init, label, student, sets, a, work)
    save_partial()

    dstudent = copy.deepcopy(student)
    ckpt = work / "distilled"
    tag = (f"n{a.distill_images}_e{a.distill_epochs}_lr{a.lr}_b{a.block_weight}_"
           f"f{a.final_weight}_{a.trainable}_wd{a.weight_decay}_w{a.warmup_steps}{init_tag}"
           + ("" if a.feature_norm == "none" else f"_{a.feature_norm}")
           + ("_aug" if a.augment else ""))
    if (ckpt / tag / "trimtune.json").is_file():
        dstudent = tt.load_model(str(ckpt / tag))
        log("distilled student loaded from cache")
    else:
        ddata = distill_data(a.distill_images, tt.build_transform(
            teacher, train=True, protocol="fgvc") if a.augment else tf, a.seed + 1)
        a.n_distill = len(ddata)
        a.distill_parts = (f"{len(ddata.datasets[0])} Fashion-MNIST train + "
                           f"{len(ddata.datasets[1])} MNIST-5k train")
        cfg = tt.DistillConfig(
            train=tt.TrainConfig(epochs=a.distill_epochs, lr=a.lr, min_lr=1e-6,
                                 batch_size=a.batch_size, weight_decay=a.weight_decay,
                                 warmup_steps=(a.warmup_steps if a.warmup_steps >= 0
                                               else min(20, len(ddata) // a.batch_size // 4)),
                                 seed=a.seed, out_dir=str(work / "distill_run" / tag),
                                 resume="auto", ckpt_every=50, log_every=10,
                                 num_workers=a.num_workers),
            block_weight=a.block_weight, final_weight=a.final_weight, ce_weight=0.0,
            feature_norm=a.feature_norm, trainable=a.trainable)
        log(f"distilling on {len(ddata)} unlabeled images x {a.distill_epochs} epoch(s)")
        with Timer() as t:
            res = tt.distill(dstudent, teacher, ddata, cfg)
        timings["distill"] = t.seconds
        distill_log = {k: round(float(v), 5) for k, v in res.metrics.items()
                       if isinstance(v, (int, float))}
        log(f"distilled in {t.seconds:.0f}s: {distill_log}")
        tt.save_model(dstudent, ckpt / tag)
    record(results, timings, f"{a.init}+distill", f"distill_{tag}", dstudent, sets, a, work)
    save_partial(final=True)
    md, _ = report(a, info, results, timings, distill_log)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
