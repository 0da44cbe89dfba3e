"""Data-aware factorisation before any distillation (issue 15): svd vs whiten vs asvd.

DINOv2 ViT-S/14 (offline zoo, ``dinov2_small.imgfocus``) at 112 px is compressed at c = 2 three
ways and evaluated with frozen features (pre-logit CLS token) beside the original, all in one
run, with the protocol and helper functions of ``bench_distill.py`` (kNN k = 20 cosine, linear
probe on standardised features; Fashion-MNIST 1k-shot train, full 10k test):

* original  the pre-trained backbone
* svd       ``tt.compress(ratio=2)``: PELA's truncated SVD of each weight
* whiten    ``tt.compress(ratio=2, init="whiten", calib=...)``: SVD-LLM's truncation-aware
            whitening by the Gram matrix of each layer's inputs on the calibration images
* asvd      ``tt.compress(ratio=2, init="asvd", calib=...)``: ASVD's activation scaling

Calibration: ``--calib-images`` unlabeled images of ``--calib`` (default 256 Fashion-MNIST
train images, a seeded stratified draw; labels unused) streamed through the original model.

Run (about 10 minutes on 2 shared CPU cores):
    .venv/bin/python benchmarks/bench_init.py
Writes benchmarks/results/init_<tag>.{md,json,png}; partial JSON after every model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, Timer, load_eval_sets, log, machine_info,  # noqa: E402
                     machine_markdown, md_table, write_results)
from bench_distill import EVAL_SETS, record  # noqa: E402  (same protocol and helpers)

import trimtune as tt  # noqa: E402
from trimtune.data import stratified_choice  # noqa: E402
from trimtune.lowrank import factorised_layers  # noqa: E402
from trimtune.measure.plots import plot_bars  # noqa: E402

INITS = ("svd", "whiten", "asvd")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--ratio", type=float, default=2.0, help="PELA compression ratio c")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--calib", default="fashion-mnist", help="calibration images (unlabeled)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--sets", nargs="+", default=["fashion-mnist 1k-shot"],
                    choices=list(EVAL_SETS), help="evaluation sets of bench_distill")
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=0,
                    help="cap each test set (stratified, seeded); 0 = full test sets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_init", help="feature cache")
    ap.add_argument("--tag", default="cpu", help="results file: init_<tag>.*")
    ap.add_argument("--fidelity-only", type=int, default=0, metavar="N",
                    help="quick mode: skip kNN / probe; compare each compressed model's CLS "
                         "features with the original's on N test images (cosine, relative "
                         "error); writes init_fidelity_<tag>.*")
    return ap.parse_args(argv)


def report(a, info: dict, results: dict, timings: dict) -> tuple[str, dict]:
    cols = [(n, p) for n in a.sets for p in ("knn", "probe")]
    header = ["model", "params (M)"] + [f"{n}: {p}" for n, p in cols]
    rows = [[m, f"{r['params_M']:.2f}"] + [f"{100 * r['acc'][n][p]:.2f}" for n, p in cols]
            for m, r in results.items()]
    md = [f"# Factor init before distillation: {a.model} at {a.img_size}px, c = {a.ratio}", "",
          "Frozen pre-logit CLS features, accuracy in % (protocol and helpers of "
          f"`bench_distill.py`: kNN k = {a.knn_k} cosine; probe: sklearn LogisticRegression "
          "C = 0.5 on standardised features). Fashion-MNIST: 1k-shot train (`fashion-mnist:1k`,"
          f" seed {a.seed}), {'full 10k' if not a.test_images else a.test_images} test images. "
          f"Calibration (whiten, asvd): {a.calib_images} unlabeled `{a.calib}` train images "
          "(seeded stratified draw, labels unused) through the original model.", "",
          md_table(header, rows), ""]
    if "original" in results and "svd" in results:
        loss_rows = []
        for n, p in cols:
            o = results["original"]["acc"][n][p]
            s_loss = o - results["svd"]["acc"][n][p]
            for m in results:
                if m in ("original", "svd"):
                    continue
                loss = o - results[m]["acc"][n][p]
                loss_rows.append([n, p, m, f"{100 * s_loss:.2f}", f"{100 * loss:.2f}",
                                  f"{loss / s_loss:.2f}" if s_loss > 0 else "-",
                                  "yes" if s_loss > 0 and loss <= s_loss / 2 else "no"])
        md += ["Loss to the original (points; goal: whitening at least halves the loss of plain "
               "SVD):", "", md_table(["dataset", "protocol", "init", "svd loss", "init loss",
                                      "ratio", "halved"], loss_rows), ""]
    md += ["## Compute", "", md_table(["stage", "wall (s)"],
                                      [[k, f"{v:.1f}"] for k, v in timings.items()]), "",
           "The 2 CPU cores were shared with other engineers' jobs while this ran: wall times "
           "are indicative only; accuracies do not depend on it.", "",
           "## Machine", "", machine_markdown(info), ""]
    notes = RESULTS / f"init_{a.tag}_notes.md"  # hand-written reading of the figures
    if notes.is_file():
        md += [notes.read_text().rstrip(), ""]
    groups = {m: {f"{n} {p}": 100 * r["acc"][n][p] for n, p in cols}
              for m, r in results.items()}
    return "\n".join(md), groups


def fidelity(a) -> int:
    """Quick mode: feature fidelity of svd / whiten / asvd to the original on N test images."""
    teacher = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size).eval()
    te = tt.load_dataset("fashion-mnist", "test", transform=tt.build_transform(teacher),
                         seed=a.seed)
    te = te.subset(stratified_choice(te.targets, a.fidelity_only, a.seed))
    x = torch.stack([te[i][0] for i in range(len(te))])

    @torch.no_grad()  # (not around compress: its forward-path probe needs gradients)
    def feats(m):
        return torch.cat([m.forward_head(m.forward_features(c), pre_logits=True)
                          for c in x.split(32)]).double()

    def layer_input_rms(m, names):
        """RMS of each named module's input on ``x``."""
        got: dict[str, list] = {n: [] for n in names}
        hs = [m.get_submodule(n).register_forward_hook(
            lambda mod, i, o, n=n: got[n].append(i[0].double().pow(2).mean()))
            for n in names]
        feats(m)
        for h in hs:
            h.remove()
        return {n: float(torch.stack(v).mean().sqrt()) for n, v in got.items()}

    ref = feats(teacher)
    rows, scale_rows, data = [], [], {}
    orig_rms: dict[str, float] = {}
    for init in a.inits:
        kw = {} if init == "svd" else dict(calib=a.calib, calib_images=a.calib_images)
        with Timer() as t:
            student = tt.compress(teacher, ratio=a.ratio, init=init, **kw).eval()
        f = feats(student)
        cos = float(torch.nn.functional.cosine_similarity(f, ref, dim=1).mean())
        rel = float((f - ref).norm() / ref.norm())
        data[init] = {"cosine": cos, "rel_error": rel, "compress_s": t.seconds,
                      "init": student.trimtune_lowrank["init"]}
        rows.append([init, f"{cos:.4f}", f"{rel:.4f}", f"{t.seconds:.0f}"])
        # what an adapter on a factorised layer sees: .second's input vs the original input
        layers = factorised_layers(student)
        orig_rms = orig_rms or layer_input_rms(teacher, list(layers))
        sec = layer_input_rms(student, [f"{n}.second" for n in layers])
        ratio = torch.tensor([sec[f"{n}.second"] / orig_rms[n] for n in layers])
        norms = torch.tensor([float(m.second.weight.norm() / m.first.weight.norm())
                              for m in layers.values()])
        data[init].update(second_input_rms_ratio=ratio.tolist(),
                          second_first_norm_ratio=norms.tolist())
        variants = [(init, 1.0)]
        tokens = student.trimtune_lowrank["init"].get("calib_tokens")
        if init == "whiten" and tokens:  # SVD-LLM's summed Gram: S and s grow as sqrt(tokens)
            variants.append((f"whiten, summed Gram (SVD-LLM; {tokens} tokens)", tokens ** 0.25))
        for label, k in variants:
            r = ratio / k
            scale_rows.append([label, f"{r.median():.3f}", f"{r.min():.3f} - {r.max():.3f}",
                               f"{(norms * k * k).median():.2f}"])
        log(f"{init}: cosine {cos:.4f}, relative error {rel:.4f} ({t.seconds:.0f}s)")
    md = [f"# Factor init, feature fidelity: {a.model} at {a.img_size}px, c = {a.ratio}", "",
          f"Pre-logit CLS features of the compressed model vs the original on {len(x)} "
          "Fashion-MNIST test images (seeded stratified draw; disjoint from the calibration "
          f"images, {a.calib_images} unlabeled `{a.calib}` train images); no distillation. "
          "A quick proxy of the kNN / probe comparison (`init_cpu.md`); "
          "higher cosine / lower error = closer to the original.", "",
          md_table(["init", "mean cosine", "relative error", "compress + calibrate (s)"], rows),
          "", "What a tuner adapting a factorised layer (on `.second`) sees: the RMS of "
          "`.second`'s input over the RMS of the original layer's input, on the same images, "
          f"over the {len(orig_rms)} factorised layers; and the factors' "
          "Frobenius-norm ratio. The summed-Gram row is exact arithmetic on the whiten row: "
          "with `X^T X` summed over n tokens instead of averaged, `S` and the singular values "
          "grow by sqrt(n), so `.second`'s input shrinks by n^(1/4) and the norm ratio grows "
          "by n^(1/2); the product `W2 W1` is the same.", "",
          md_table(["init", ".second input RMS / original input RMS (median)", "min - max",
                    "median |second| / |first|"], scale_rows), "",
          f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (above 2: the machine was shared, wall times are upper "
          "bounds).", "",
          "## Machine", "", machine_markdown(machine_info()), ""]
    write_results(f"init_fidelity_{a.tag}", "\n".join(md), {"args": vars(a), "results": data})
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.fidelity_only:
        torch.set_num_threads(a.threads)
        return fidelity(a)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}

    def save(final: bool = False) -> None:
        md, groups = report(a, info, results, timings)
        data = {"args": vars(a), "machine": info, "results": results, "timings_s": timings,
                "complete": final}
        fig = (lambda p: plot_bars(groups, p, ylabel="accuracy (%)",
                                   title=f"{a.model} {a.img_size}px, c={a.ratio}, no "
                                         "distillation")) if groups else None
        write_results(f"init_{a.tag}", md, data, figure=fig)

    teacher = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size).eval()
    sets = load_eval_sets(teacher, {n: EVAL_SETS[n] for n in a.sets}, a.test_images, a.seed)
    record(results, timings, "original", "original", teacher, sets, a, work)
    save()
    for init in a.inits:
        kw = {} if init == "svd" else dict(calib=a.calib, calib_images=a.calib_images)
        with Timer() as t:
            student = tt.compress(teacher, ratio=a.ratio, init=init, **kw)
        timings[f"compress {init}"] = t.seconds
        log(f"{init}: compressed in {t.seconds:.1f}s ({student.trimtune_lowrank['init']})")
        record(results, timings, init, f"{init}_c{a.ratio}_n{a.calib_images}", student, sets,
               a, work, init=student.trimtune_lowrank["init"])
        save()
    save(final=True)
    md, _ = report(a, info, results, timings)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
