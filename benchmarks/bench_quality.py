"""Fine-tuning quality on real weights and real images: SNELLA vs LoRA and the baselines, with
seeds, error bars and an ablation of SNELLA (issue 12).

Backbone: DINOv2 ViT-S/14 from the offline zoo (``dinov2_small.imgfocus``). Tasks: few-shot
sets of real images (``fashion-mnist:1k``, ``mnist-5k:1k``), tested once on their test split.
Variants: ``linear``, ``lora-r8``, ``lora-r32``, ``snell-r8``, ``snella-r8``, ``snella-r32``,
``full`` (PEFT's LoRA on q/k/v/proj/fc1/fc2; SNELL/SNELLA on the same layers).

Protocol (identical for every variant; the test set is never used for any choice):

1. Each seed draws its own few-shot set and its own ``train800`` / ``val200`` split (the data
   seed is the run seed, so all variants are paired on the same images per seed).
2. lr: every variant has a 2-value grid of its usual range (``DEFAULT_LRS``). With
   ``--lr-select first-seed`` (default) the grid is searched on the first seed (train on
   ``train800``, best val accuracy over epochs) and the selected lr is reused for the other
   seeds; ``every-seed`` searches on every seed (2x the compute).
3. Every run keeps its best-val epoch (``tt.finetune``); that model is merged (``tt.merge``) and
   evaluated once on the test split.
4. Reported: mean and standard deviation over seeds, and the paired difference per seed
   (snella - lora at the same rank, snella - full).

Ablation (``--ablation``, first task): SNELLA r = 8 at its selected lr, one component changed
at a time: the authors' regularisation + schedule settings (branch dropout / drop-path and
backbone drop-path 0.1, epoch schedule, init sparsity 0.01), the piecewise kernel, no
allocator (fixed sparsity = the target), no sparsity at all (the dense mixture-kernel update,
SNELL at s = 0), the epoch schedule alone, target sparsity 0.5 / 0.9,
and the full-derivative sparsifier (``squared``: trimtune's behaviour before it followed the
authors' detached magnitude).

Presets (explicit flags win):
    reduced  56 px, 3 epochs, 3 seeds, 2,000 stratified test images; fits about an hour of an
             idle 2-core CPU (what CI-class machines can run)
    full     112 px, 10 epochs, 5 seeds, the whole test set (a GPU: --device cuda)

Variants run in the order of ``--variants`` (the question first), the ablation after
``--ablation-after``; results are written after every run, so a run stopped by a time limit
leaves the most important rows.

Run:
    .venv/bin/python benchmarks/bench_quality.py --preset reduced --ablation
    .venv/bin/python benchmarks/bench_quality.py --preset full --ablation --tag cuda
Writes benchmarks/results/quality_<tag>.{md,json,png} after every run (partial results are
marked as such); ``--resume`` keeps the runs already in that JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, Timer, log, machine_info, machine_markdown, md_table,  # noqa: E402
                     write_results)

import trimtune as tt  # noqa: E402
from trimtune.data import stratified_choice  # noqa: E402
from trimtune.measure.plots import plot_bars  # noqa: E402
from trimtune.train.callbacks import NEVER_LEFT_CHANCE  # noqa: E402
from trimtune.tuners.targets import DEFAULT_TARGETS  # noqa: E402

DEFAULT_LRS = {  # 2-value grids, the usual ranges of each method (AdamW, batch 32)
    "linear": (3e-3, 1e-2),
    "lora": (1e-3, 3e-3),
    "snell": (1e-3, 3e-3),
    "snella": (1e-3, 3e-3),
    "full": (3e-5, 1e-4),
}

#: the default target layers, both factors of each (a pattern naming a factor selects it)
BOTH_FACTORS = DEFAULT_TARGETS + r"\.(first|second)"

#: name -> FinetuneConfig fields (sparsity: the --sparsity flag unless set here)
VARIANTS = {
    "linear": dict(method="linear"),
    "lora-r8": dict(method="lora", r=8),
    "lora-r32": dict(method="lora", r=32),
    "snell-r8": dict(method="snell", r=8),
    "snella-r8": dict(method="snella", r=8),
    "snella-r32": dict(method="snella", r=32),
    "full": dict(method="full"),
    # the join: the same methods on the PELA-compressed backbone (--compress-* flags)
    "lora-r8@c2": dict(method="lora", r=8, compressed=True),
    "snella-r8@c2": dict(method="snella", r=8, compressed=True),
    # which factor of a factorised layer (W = W2 W1) is adapted: .second (the default), or both
    "lora-r8@c2-both": dict(method="lora", r=8, compressed=True,
                            target_modules=BOTH_FACTORS),
    "snella-r8@c2-both": dict(method="snella", r=8, compressed=True,
                              target_modules=BOTH_FACTORS),
    # options beyond the authors (issue 22), each one named change to snella-r8
    "snella-r8+klr": dict(method="snella", r=8, method_kwargs={"kernel_lr_scale": 0.01}),
    "snella-r8+b4": dict(method="snella", r=8, method_kwargs={"b_lr_scale": 4.0}),
    "snella-r8+klr+b4": dict(method="snella", r=8,
                             method_kwargs={"kernel_lr_scale": 0.01, "b_lr_scale": 4.0}),
    "snella-r8+init0.25": dict(method="snella", r=8, method_kwargs={"init_scale": 0.25}),
    "snella-r8+soft": dict(method="snella", r=8, method_kwargs={"sparsify": "soft"}),
    "snella-r8+klr+soft": dict(method="snella", r=8, method_kwargs={
        "kernel_lr_scale": 0.01, "sparsify": "soft"}),
    # the budget fixed from step 0 (init sparsity = --sparsity): the allocator only moves it
    # between layers, no dense-to-sparse ramp (the ladder's costly component, issue 22)
    "snella-r8+klr+fixed": dict(method="snella", r=8, fixed_budget=True,
                                method_kwargs={"kernel_lr_scale": 0.01}),
    # ... with SNELL's piecewise kernel and kernel lr: snell-r8 plus the allocator moving a
    # fixed budget between layers
    "snella-r8+fixed+pw": dict(method="snella", r=8, fixed_budget=True, kernel="piecewise"),
    # ... with a floor: every unit keeps >= 10 % of its entries (min_density), so the allocator
    # cannot switch a unit off for good (it did: q, k, fc1 of most blocks at the first step)
    "snella-r8+fixed+pw+floor": dict(method="snella", r=8, fixed_budget=True, kernel="piecewise",
                                     method_kwargs={"min_density": 0.1}),
    # ... and no reallocation before 30 % of the run (t_init): the scores settle first
    "snella-r8+fixed+pw+floor+late": dict(method="snella", r=8, fixed_budget=True,
                                          kernel="piecewise", t_init=0.3,
                                          method_kwargs={"min_density": 0.1}),
    # ... or reallocating at epoch ends only (the authors' train_alloc.py timing) instead of
    # after every step: each decision sees a whole epoch of scores, and the masks churn less
    "snella-r8+fixed+pw+floor+epoch": dict(method="snella", r=8, fixed_budget=True,
                                           kernel="piecewise", schedule_unit="epoch",
                                           method_kwargs={"min_density": 0.1}),
    # the competition without the squaring (sparsify "mask": dW 1[|dW| > t]): the update grows
    # linearly in the factors as LoRA's, not as dW |dW| (tiny at init, needs a 10x higher lr)
    "snell-r8+mask": dict(method="snell", r=8, method_kwargs={"sparsify": "mask"}),
    # the `fast` recipe (snella-r8+klr) with the floor and reallocation at epoch ends: the
    # candidate for fast's new defaults (both are in +fixed+pw+floor+epoch, the best so far)
    "snella-r8+klr+floor+epoch": dict(method="snella", r=8, schedule_unit="epoch",
                                      method_kwargs={"kernel_lr_scale": 0.01,
                                                     "min_density": 0.1}),
    # ... with the inner-product kernel A B^T in place of the piecewise distance kernel (the
    # ladder's snell-r8:inner-dense beat snell-r8 by 1.67 on Fashion-MNIST at 3 epochs)
    "snella-r8+fixed+inner+floor+epoch": dict(
        method="snella", r=8, fixed_budget=True, kernel="inner", schedule_unit="epoch",
        method_kwargs={"min_density": 0.1}),
    "snella-r8+fixed+inner+floor+epoch+mask": dict(
        method="snella", r=8, fixed_budget=True, kernel="inner", schedule_unit="epoch",
        method_kwargs={"min_density": 0.1, "sparsify": "mask"}),
    "snella-r8+fixed+pw+floor+epoch+mask": dict(
        method="snella", r=8, fixed_budget=True, kernel="piecewise", schedule_unit="epoch",
        method_kwargs={"min_density": 0.1, "sparsify": "mask"}),
}

#: the pseudo-variant of --select-among: per task, the candidate whose selected run on the first
#: seed has the best val accuracy (a hyperparameter such as the sparsity, chosen like the lr)
VAL_BEST = "val-best"

#: ablation name -> changes to snella-r8 (run at snella-r8's selected lr)
ABLATIONS = {
    "authors-settings": dict(branch_dropout=0.1, branch_drop_path=0.1, drop_path_rate=0.1,
                             schedule_unit="epoch", init_sparsity=0.01),
    "piecewise-kernel": dict(kernel="piecewise"),
    "no-allocator": dict(method="snell", kernel="mixture"),
    # no competition at all: the dense mixture-kernel update (the authors' SNELL at s = 0, KLoRA)
    "no-sparsity": dict(method="snell", kernel="mixture", target_sparsity=0.0),
    # ... and no kernel either: SNELL's inner-product update A B^T, dense (LoRA's form with
    # SNELL's factor init and lr options): the ladder LoRA -> inner-dense -> no-sparsity -> SNELLA
    "inner-dense": dict(method="snell", kernel="inner", target_sparsity=0.0),
    # ... started at zero as LoRA (B = 0): is SNELL's random start what costs it against LoRA?
    "inner-dense-zero-b": dict(method="snell", kernel="inner", target_sparsity=0.0,
                               method_kwargs={"b_init_scale": 0.0}),
    # SNELL's own kernel with nothing competing (KLoRA: the plain kernel update, no squaring):
    # with ``inner-dense`` it splits snell-r8's gap to LoRA into kernel and sparsifier
    "dense": dict(target_sparsity=0.0),
    "epoch-schedule": dict(schedule_unit="epoch"),
    "sparsity-0.5": dict(target_sparsity=0.5),
    "sparsity-0.9": dict(target_sparsity=0.9),
    "squared-grad": dict(method_kwargs={"sparsify": "squared"}),
}

CALIB_SEED = 99  # the draw of unlabeled train images that calibrates / distils the @c2 backbone

PRESETS = {
    "reduced": dict(img_size=56, epochs=3, seeds="0,1,2", test_images=2000),
    "full": dict(img_size=112, epochs=10, seeds="0,1,2,3,4", test_images=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                    help="img size, epochs, seeds and test cap (explicit flags win)")
    ap.add_argument("--model", default="dinov2_small.imgfocus", help="backbone")
    ap.add_argument("--tasks", default="fashion-mnist:1k,mnist-5k:1k",
                    help="few-shot training sets; each is tested on NAME@test")
    ap.add_argument("--variants", default="lora-r8,snella-r8,full,linear,snell-r8,lora-r32,"
                    "snella-r32", help="comma list of VARIANTS, run in this order")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the SNELLA ablation on the first task")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="which ablations")
    ap.add_argument("--ablation-after", default="snella-r8",
                    help="run the ablation once this variant is done (snella-r8 or later)")
    ap.add_argument("--ablation-base", default="snella-r8",
                    help="the SNELLA variant each ablation changes one component of, at its "
                    "selected lr (e.g. snella-r8+klr, the fast recipe's)")
    ap.add_argument("--img-size", type=int, default=None, help="resolution (preset)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (preset)")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (preset)")
    ap.add_argument("--test-images", type=int, default=None,
                    help="cap the test set (stratified, seeded); 0 = all (preset)")
    ap.add_argument("--lr-select", choices=("first-seed", "every-seed"), default="first-seed",
                    help="search the lr grid on the first seed only, or on every seed")
    ap.add_argument("--lrs", default="", help='override grids, JSON: {"lora": [1e-3, 3e-3]}')
    ap.add_argument("--widen", type=int, default=3,
                    help="when the lr selected on val is at an edge of the grid, add the next "
                         "value beyond it (the grid's own step) and search again, up to this "
                         "many times per (task, variant); 0: the grid as given")
    ap.add_argument("--sparsity", type=float, default=0.7, help="snell / snella sparsity")
    ap.add_argument("--compress-ratio", type=float, default=2.0,
                    help="PELA ratio c of the @c2 variants' backbone")
    ap.add_argument("--compress-init", default="whiten",
                    help="factorisation of the @c2 backbone: svd, whiten or asvd")
    ap.add_argument("--calib-images", type=int, default=256,
                    help="unlabeled calibration images of the @c2 backbone (the task's train "
                    "split, a draw of its own, seed 99)")
    ap.add_argument("--distill-epochs", type=int, default=0,
                    help="PELA distillation epochs of the @c2 backbone on those images "
                    "(0: factorised only)")
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="its lr")
    ap.add_argument("--distill-images", type=int, default=0,
                    help="distil on this many unlabeled images of the task's whole train split "
                    "(a seeded stratified draw; labels unused) instead of the calibration draw "
                    "(0)")
    ap.add_argument("--distill-feature-norm", choices=("none", "layernorm"), default="none",
                    help="its token features: raw (authors) or layer-normalised")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--work", default="runs/bench_quality", help="scratch run folders")
    ap.add_argument("--tag", default="cpu", help="results file: quality_<tag>.*")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rewrite quality_<tag>.{md,png} from its JSON (runs and "
                         "machine as recorded; e.g. after benchmarks/quality_pool.py)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in quality_<tag>.json")
    ap.add_argument("--select-among", default="",
                    help="comma list of variants (e.g. one at two sparsities): the report adds "
                         f"'{VAL_BEST}', per task the one whose selected run has the best val "
                         "accuracy on the first seed (chosen like the lr, never on test), "
                         "paired against LoRA of its rank")
    ap.add_argument("--pool-with", default="",
                    help="comma list of other study tags run with the same protocol on other "
                         "seeds (a replication): the report adds the paired differences pooled "
                         "over all of them, each study's lr selected on its own first seed")
    a = ap.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.seed_list = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    a.task_list = [t.strip() for t in a.tasks.split(",") if t.strip()]
    a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    if a.lrs:
        try:
            grids = json.loads(a.lrs)
        except json.JSONDecodeError as e:
            ap.error(f"--lrs is not JSON ({e.msg}): give e.g. '{{\"lora\": [0.001, 0.003]}}'")
        if not isinstance(grids, dict) or not all(
                isinstance(v, list) and v and all(isinstance(x, (int, float)) and
                                                  not isinstance(x, bool) and x > 0 for x in v)
                for v in grids.values()):
            ap.error("--lrs: every method needs a non-empty list of positive numbers, e.g. "
                     "'{\"lora\": [0.001, 0.003]}'")
        unknown = sorted(set(grids) - set(DEFAULT_LRS))
        if unknown:
            ap.error(f"--lrs names unknown method(s) {unknown}: use {sorted(DEFAULT_LRS)}")
    if a.widen < 0:
        ap.error(f"--widen {a.widen}: give 0 (no widening) or more")
    a.select_list = [v.strip() for v in a.select_among.split(",") if v.strip()]
    if len(a.select_list) == 1:
        ap.error(f"--select-among {a.select_among}: give two or more of the study's --variants")
    a.ablation_list = [v.strip() for v in a.ablations.split(",") if v.strip()] \
        if a.ablation else []
    # an ablation named in --variants ("snella-r8+klr:no-sparsity") gets its own lr grid
    bad = [v for v in a.variant_list + [a.ablation_base]
           if v.partition(":")[0] not in VARIANTS or
           (v.partition(":")[2] and v.partition(":")[2] not in ABLATIONS)] + [
        v for v in a.ablation_list if v not in ABLATIONS]
    if bad:
        ap.error(f"unknown variant/ablation {bad}: choose from {list(VARIANTS)} / "
                 f"{list(ABLATIONS)}")
    if not a.seed_list or not a.task_list:
        ap.error("give at least one seed and one task")
    a.pool_list = [t.strip() for t in a.pool_with.split(",") if t.strip()]
    for t in a.pool_list:
        if not (RESULTS / f"quality_{t}.json").is_file():
            ap.error(f"--pool-with {t}: no {RESULTS / f'quality_{t}.json'}; give the tag of a "
                     "finished study (its quality_<tag>.json in the results folder)")
    return a


class Pretransformed(torch.utils.data.Dataset):
    """A dataset's transformed images, computed once and kept as float16 (N, 3, H, W). Exact
    for the VTAB protocol used here (resize + normalise, no random augmentation): every epoch
    and every variant then skip the per-image PIL work."""

    def __init__(self, ds, batch_size: int = 256) -> None:
        xs, ys = [], []
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            xs.append(x.half())
            ys.append(torch.as_tensor(y))
        self.x, self.y = torch.cat(xs), torch.cat(ys)
        self.num_classes, self.classes = ds.num_classes, getattr(ds, "classes", None)
        self.targets = self.y.tolist()
        self.spec = f"{getattr(ds, 'spec', '?')}@{getattr(ds, 'split', '?')}"

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].float(), int(self.y[i])


def variant_config(name: str, a) -> dict:
    """FinetuneConfig fields of a main variant (``lora-r8``) or an ablation
    (``snella-r8:piecewise-kernel``)."""
    base, _, abl = name.partition(":")
    cfg = {"target_sparsity": a.sparsity, **VARIANTS[base]}
    cfg.pop("compressed", None)
    fixed = cfg.pop("fixed_budget", False)
    if abl:  # one change: its method options join the base's (snella-r8+klr keeps klr)
        change = dict(ABLATIONS[abl])
        kw = {**cfg.get("method_kwargs", {}), **change.pop("method_kwargs", {})}
        cfg.update(change)
        if kw:
            cfg["method_kwargs"] = kw
    if fixed:  # after the ablation: a fixed budget starts at the target the ablation sets
        cfg["init_sparsity"] = cfg["target_sparsity"]
    return cfg


def preset_label(a) -> str:
    """``Preset `reduced``` when every preset setting is the preset's, else the preset and
    what was changed (``Preset `reduced` with img_size 112, epochs 10``)."""
    changed = [f"{k} {getattr(a, k)}" for k, v in PRESETS[a.preset].items()
               if str(getattr(a, k)) != str(v)]
    return f"Preset `{a.preset}`" + (f" with {', '.join(changed)}" if changed else "")


def _lora_of(name: str) -> str:
    """The LoRA variant of the same rank (``snell-r8+mask:dense`` -> ``lora-r8``)."""
    return re.sub(r"^snella?", "lora", name.partition(":")[0].partition("+")[0])


def lr_grid(name: str, grids: dict) -> tuple[float, ...]:
    """The lr grid of a variant: its method's (an ablation is run at snella-r8's lr)."""
    return grids[VARIANTS[name.partition(":")[0]]["method"]]


class Study:
    """Runs (task, variant, seed, lr) once each, keeping every result in ``self.runs``."""

    def __init__(self, a, base: torch.nn.Module, info: dict) -> None:
        self.a, self.base, self.info = a, base, info
        self.runs: dict[str, dict] = {}
        self.data: dict[tuple[str, int], tuple] = {}
        self.tests: dict[str, Pretransformed] = {}
        self.compressed: dict[str, torch.nn.Module] = {}
        self.compressed_info: dict[str, dict] = {}
        self.models: dict[str, torch.nn.Module] = {}  # merged models awaiting selection
        self.grids: dict[str, tuple] = dict(DEFAULT_LRS)  # main() sets the run's grids
        self.searched: dict[tuple[str, str], list[float]] = {}  # (task, variant) -> grid run
        self.t0 = time.time()
        prev = RESULTS / f"quality_{a.tag}.json"
        if (a.resume or a.report_only) and prev.is_file():
            old = json.loads(prev.read_text())
            self.runs = old.get("runs", {})
            # the backbones' record, for the report when every @c run is already done
            self.compressed_info = old.get("compressed_backbones", {})
            if a.report_only:  # the machine the runs ran on
                self.info = old.get("machine", info)
            log(f"resuming: {len(self.runs)} runs already done")

    # ------------------------------------------------------------------ data
    def split(self, task: str, seed: int):
        key = (task, seed)
        if key not in self.data:
            tf = tt.build_transform(self.base, train=False)
            self.data = {k: v for k, v in self.data.items() if k[0] == task}  # bound memory
            self.data[key] = tuple(Pretransformed(tt.load_dataset(task, s, transform=tf,
                                                                  seed=seed))
                                   for s in ("train800", "val"))
        return self.data[key]

    def test_set(self, task: str) -> Pretransformed:
        if task not in self.tests:
            name = task.split(":")[0]
            ds = tt.load_dataset(name, "test", transform=tt.build_transform(self.base,
                                                                            train=False))
            if self.a.test_images and self.a.test_images < len(ds):
                ds = ds.subset(stratified_choice(ds.targets, self.a.test_images, 0))
            self.tests = {task: Pretransformed(ds)}
        return self.tests[task]

    # ------------------------------------------------------------------ backbones
    def base_for(self, task: str, variant: str) -> torch.nn.Module:
        """The backbone a variant starts from: the original, or (``@c2`` variants) the
        PELA-compressed one, built once per task from unlabeled images of the task's train split
        (a draw of its own, seed :data:`CALIB_SEED`; the test split is never read)."""
        if not VARIANTS[variant.partition(":")[0]].get("compressed"):
            return self.base
        if task not in self.compressed:
            a = self.a
            calib = Pretransformed(tt.load_dataset(
                task, "train800", transform=tt.build_transform(self.base, train=False),
                seed=CALIB_SEED))
            with Timer() as t:
                student = tt.compress(copy.deepcopy(self.base), ratio=a.compress_ratio,
                                      init=a.compress_init, calib=calib,
                                      calib_images=a.calib_images)
            info = {"ratio": a.compress_ratio, "init": a.compress_init,
                    "calib_images": min(a.calib_images, len(calib)), "compress_s": t.seconds,
                    "params": sum(p.numel() for p in student.parameters()),
                    "original_params": sum(p.numel() for p in self.base.parameters())}
            if a.distill_epochs:
                dset, what = calib, "the same draw"
                if a.distill_images:  # unlabeled images of the whole train split
                    name = task.split(":")[0]
                    full = tt.load_dataset(name, "train", seed=CALIB_SEED,
                                           transform=tt.build_transform(self.base, train=False))
                    if a.distill_images < len(full):
                        full = full.subset(stratified_choice(full.targets, a.distill_images,
                                                             CALIB_SEED))
                    dset, what = Pretransformed(full), f"`{name}` train (a draw)"
                out = Path(a.work) / task.replace(":", "_") / "distill"
                shutil.rmtree(out, ignore_errors=True)
                dc = tt.DistillConfig(ce_weight=0.0, feature_norm=a.distill_feature_norm,
                                      train=tt.TrainConfig(
                    epochs=a.distill_epochs, lr=a.distill_lr, batch_size=a.batch_size,
                    warmup_epochs=0.5, seed=CALIB_SEED, out_dir=str(out), resume=False,
                    progress=False))
                with Timer() as t:
                    tt.distill(student, self.base, dset, dc)
                info.update(distill_images=len(dset), distill_from=what,
                            distill_epochs=a.distill_epochs,
                            distill_lr=a.distill_lr,
                            distill_feature_norm=a.distill_feature_norm, distill_s=t.seconds)
            log(f"compressed backbone for {task}: {info}")
            self.compressed[task] = student
            self.compressed_info[task] = info
        return self.compressed[task]

    # ------------------------------------------------------------------ one run
    def run(self, task: str, variant: str, seed: int, lr: float, test: bool = False) -> dict:
        key = f"{task}|{variant}|{seed}|{lr:g}"
        if key in self.runs and (not test or "test_top1" in self.runs[key]
                                 or key in self.models):
            return self.test(key) if test else self.runs[key]
        if key in self.runs:  # a grid run selected later, its model not kept: train it again
            log(f"  {key}: trained again to test it (its model was not kept)")
        row = self._train(task, variant, seed, lr, key)
        return self.test(key) if test else row

    def _train(self, task: str, variant: str, seed: int, lr: float, key: str) -> dict:
        a = self.a
        train, val = self.split(task, seed)
        out = Path(a.work) / task.replace(":", "_") / variant.replace(":", "_") / f"s{seed}_{lr:g}"
        shutil.rmtree(out, ignore_errors=True)  # scratch folders: a rerun starts clean
        tc = tt.TrainConfig(epochs=a.epochs, lr=lr, min_lr=1e-6, batch_size=a.batch_size,
                            warmup_epochs=0.5, weight_decay=1e-4, seed=seed, out_dir=str(out),
                            resume=False, progress=False, log_every=10)
        cfg = tt.FinetuneConfig(**variant_config(variant, a), train=tc)
        with Timer() as t:
            r = tt.finetune(copy.deepcopy(self.base_for(task, variant)), train, cfg,
                            eval_data=val)
        curve = [h["val_acc"] for h in r.history if "val_acc" in h]
        row = {"task": task, "variant": variant, "seed": seed, "lr": lr,
               "best_val_acc": r.best["val_acc"], "val_curve": curve, "train_wall_s": t.seconds,
               "trainable_params": int(sum(p.numel() for p in r.model.parameters()
                                           if p.requires_grad))}
        row["warnings"] = list(r.warnings)  # collapse notes (train/callbacks.py)
        row["load_avg"] = os.getloadavg()[0]
        self.runs[key] = row
        self.models[key] = tt.merge(r.model)
        log(f"  {key}: val {row['best_val_acc']:.4f} (curve "
            f"{[round(v, 3) for v in curve]}), {row['train_wall_s']:.0f}s, load "
            f"{row['load_avg']:.1f}" + (f"; WARNED: {row['warnings'][0]}" if row["warnings"]
                                          else ""))
        self.save(final=False)
        return row

    def test(self, key: str) -> dict:
        """The test figure of run ``key`` (a selected run: the test split is read once per
        selected run, never for a choice)."""
        row = self.runs[key]
        if "test_top1" not in row:
            task = row["task"]
            with Timer() as t:
                row["test_top1"] = tt.evaluate_model(self.models.pop(key), self.test_set(task),
                                                     progress=False).top1
            row["test_wall_s"] = t.seconds
            log(f"  {key}: test {row['test_top1']:.4f}")
            self.save(final=False)
        self.models.pop(key, None)
        return row

    def select_lr(self, task: str, variant: str, seed: int, grids: dict) -> float:
        """Best-val lr for (task, variant), searched on ``seed``: the method's grid, widened
        by its own step past an edge that wins, up to ``--widen`` times (:func:`widened`);
        the selected run is tested, the others never."""
        grid = list(lr_grid(variant, grids))
        for _ in range(self.a.widen + 1):
            rows = [self.run(task, variant, seed, lr) for lr in grid]
            best = pick_lr(rows)
            more = widened(grid, best)
            if more is None or len(grid) >= len(lr_grid(variant, grids)) + self.a.widen:
                break
            log(f"  {task} / {variant}: lr {best:g} is at the edge of {grid}: widening")
            grid = more
        self.searched[(task, variant)] = sorted(grid)
        for lr in grid:  # the grid's other models are dropped untested
            if lr != best:
                self.models.pop(f"{task}|{variant}|{seed}|{lr:g}", None)
        self.run(task, variant, seed, best, test=True)
        return best

    def study(self, task: str, variant: str, grids: dict, lr: float | None = None) -> None:
        seeds = self.a.seed_list
        for i, seed in enumerate(seeds):
            if lr is not None:
                self.run(task, variant, seed, lr, test=True)
            elif i == 0 or self.a.lr_select == "every-seed":
                chosen = self.select_lr(task, variant, seed, grids)
                if self.a.lr_select == "first-seed":
                    lr_first = chosen
            else:
                self.run(task, variant, seed, lr_first, test=True)

    # ------------------------------------------------------------------ results
    def selected(self, task: str, variant: str) -> dict[int, dict]:
        """Per seed, the run whose lr was selected on val (the test figure that counts)."""
        return select_runs(self.runs, task, variant, self.a.seed_list[0], self.a.lr_select,
                           among=self.a.select_list)

    def save(self, final: bool) -> None:
        md, groups, errors = self.report(final)
        data = {"args": {k: v for k, v in vars(self.a).items() if k != "replicates"},
                "machine": self.info,
                "runs": self.runs, "compressed_backbones": self.compressed_info,
                "complete": final}
        write_results(f"quality_{self.a.tag}", md, data,
                      figure=(lambda p: plot_bars(groups, p, ylabel="test top-1 (%)",
                                                  title=f"{self.a.model} at {self.a.img_size}px"
                                                  f", mean and std over seeds",
                                                  errors=errors, ylim=(40, 100)))
                      if groups else None)

    def report(self, final: bool) -> tuple[str, dict, dict]:
        a = self.a
        tasks, variants = a.task_list, a.variant_list
        groups: dict[str, dict[str, float]] = {}
        errors: dict[str, dict[str, float]] = {}
        head = ["variant", "trainable params"] + [f"{t} test % (mean ± std, n)" for t in tasks] \
            + [f"{t} lr (val)" for t in tasks]
        rows = []
        for v in variants:
            cells, lrs, params = [], [], ""
            for t in tasks:
                sel = self.selected(t, v)
                accs = [100 * r["test_top1"] for r in sel.values()]
                if accs:
                    m, sd = statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1
                                                     else 0.0)
                    cells.append(f"{m:.2f} ± {sd:.2f} ({len(accs)})")
                    groups.setdefault(t, {})[v] = m
                    errors.setdefault(t, {})[v] = sd
                    lrs.append(", ".join(sorted({f"{r['lr']:g}" for r in sel.values()})))
                    params = f"{next(iter(sel.values()))['trainable_params']:,}"
                else:
                    cells.append("—")
                    lrs.append("—")
            rows.append([v, params, *cells, *lrs])
        diffs = []
        for t in tasks:
            for x, y in joins_of(variants, a.select_list):
                d = self.paired(t, x, y)
                if d:
                    diffs.append([t, f"{x} - {y}", f"{statistics.fmean(d):+.2f}",
                                  f"{statistics.stdev(d):.2f}" if len(d) > 1 else "—",
                                  " / ".join(f"{v:+.2f}" for v in d), str(len(d))])
        abl_rows = []
        if a.ablation_list:
            t = tasks[0]
            ab = a.ablation_base
            for name in [ab] + [f"{ab}:{x}" for x in a.ablation_list]:
                sel = self.selected(t, name)
                accs = [100 * r["test_top1"] for r in sel.values()]
                if not accs:
                    continue
                d = self.paired(t, name, ab) if ":" in name else []
                abl_rows.append([name, f"{statistics.fmean(accs):.2f}",
                                 f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "—",
                                 (f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d):.2f}"
                                  if len(d) > 1 else "—"), str(len(accs))])
        n_runs = len(self.runs)
        wall = sum(r["train_wall_s"] + r.get("test_wall_s", 0) for r in self.runs.values())
        search = []
        for t in tasks:
            for v in variants:
                lrs = sorted({r["lr"] for r in self.runs.values() if r["task"] == t
                              and r["variant"] == v and r["seed"] == a.seed_list[0]})
                sel = self.selected(t, v)
                if not lrs or not sel:
                    continue
                pick = next(iter(sel.values()))["lr"] if a.lr_select == "first-seed" else None
                where = ("—" if pick is None else "interior" if lrs[0] < pick < lrs[-1]
                         else "EDGE (not a result: widen the grid)")
                search.append([t, v, ", ".join(f"{x:g}" for x in lrs),
                               "—" if pick is None else f"{pick:g}", where])
        warned = [(k, r["warnings"][0]) for k, r in self.runs.items() if r.get("warnings")]
        loads = [r["load_avg"] for r in self.runs.values() if "load_avg" in r]
        cores = self.info.get("cores") or os.cpu_count() or 1
        grid_text = "; ".join(k + ": " + ", ".join(f"{x:g}" for x in v)
                              for k, v in self.grids.items())
        md = [f"# Fine-tuning quality: {a.model} at {a.img_size}px, seeds {a.seed_list}"
              + ("" if final else " (PARTIAL: the run was still going or was stopped)"), "",
              f"{preset_label(a)}: {a.epochs} epochs per run on `@train800`, batch "
              f"{a.batch_size}, AdamW (wd 1e-4), 0.5-epoch warm-up then cosine to 1e-6; sparsity "
              f"{a.sparsity} for snell / snella (snella: target of its schedule, fast recipe). "
              f"lr grid per method ({grid_text})"
              f", selected on `@val` ({a.lr_select}); each run keeps its best-val epoch; merged "
              f"and tested once on "
              + (f"{a.test_images} stratified test images" if a.test_images else
                 "the whole test split") + ". Each seed draws its own few-shot images and val "
              "split, the same for every variant (paired).", "",
              md_table(head, rows), "",
              "## Paired differences (test points, per seed: same images, same seed)", "",
              md_table(["task", "difference", "mean", "std", "per seed", "n"], diffs)
              if diffs else "(not enough runs yet)", ""]
        if a.select_list:
            picks = []
            for t in tasks:
                vals = {v: self.selected(t, v).get(a.seed_list[0], {}).get("best_val_acc")
                        for v in a.select_list}
                pick = val_best(self.runs, t, a.select_list, a.seed_list[0])
                picks.append(f"{t}: `{pick or '(not all run yet)'}` (val on seed "
                             f"{a.seed_list[0]}: " + ", ".join(
                                 f"{v} {x:.3f}" if x is not None else f"{v} —"
                                 for v, x in vals.items()) + ")")
            md += [f"`{VAL_BEST}` (--select-among, chosen on the first seed's val like the lr, "
                   "then reused for every seed): " + "; ".join(picks) + ".", ""]
        if getattr(a, "replicates", None):
            studies = [(a.tag, self.runs, a.seed_list[0]), *a.replicates]
            pooled = pooled_rows(studies, tasks, variants, a.select_list)
            md += ["## Pooled with the replicate studies (paired, each study's lr selected on "
                   "its own first seed's val)", "",
                   md_table(["task", "difference", *(f"`{tag}`" for tag, _, _ in studies),
                             "pooled mean ± std", "n", "x ahead"], pooled)
                   if pooled else "(no difference measured in two studies yet)", ""]
        for t, info in self.compressed_info.items():
            md += [f"`@c{info['ratio']:g}` variants on {t}: the backbone compressed by PELA "
                   f"(ratio {info['ratio']:g}, init `{info['init']}` calibrated on "
                   f"{info['calib_images']} unlabeled train images of a draw of its own, "
                   f"{info['params'] / 1e6:.2f}M of {info['original_params'] / 1e6:.2f}M "
                   "params, {:.0f} s)".format(info["compress_s"])
                   + (f", then distilled from the original for {info['distill_epochs']} epochs "
                      f"on {info.get('distill_images', 'the same')} unlabeled images of "
                      f"{info.get('distill_from', 'the same draw')} at lr {info['distill_lr']:g}"
                      + (f", {info['distill_feature_norm']} features"
                         if info.get("distill_feature_norm", "none") != "none" else "")
                      + f" ({info['distill_s']:.0f} s)" if info.get("distill_epochs") else
                      ", not distilled") + "; the same fine-tuning protocol as the rest.", ""]
        if search:
            md += ["## lr search (on the first seed's val split; the grid is widened past an "
                   "edge that wins)", "",
                   md_table(["task", "variant", "grid searched", "selected", "where"], search),
                   ""]
        md += [f"Runs that warned of a collapse or a diverging loss (train/callbacks.py): "
               f"{len(warned)} of {len(self.runs)}"
               + (":" if warned else "."), ""]
        md += [f"- `{k}`: {w}" for k, w in warned[:40]] + ([""] if warned else [])
        if abl_rows:
            md += [f"## SNELLA ablation ({tasks[0]}, r = 8, at {a.ablation_base}'s selected lr)",
                   "",
                   md_table(["variant", "test % mean", "std", f"paired vs {a.ablation_base}", "n"],
                            abl_rows), ""]
        md += [f"Compute: {n_runs} runs, {wall / 60:.1f} min of run wall time; 1-minute load "
               f"average during the runs {min(loads, default=0):.1f} to "
               f"{max(loads, default=0):.1f} on {cores} cores"
               + (" (the machine was shared with other jobs: wall times are upper bounds)"
                  if max(loads, default=0) > cores + 0.5 else "") + "."
               + (f" Runs went {self.info['pool_workers']} at a time "
                  "(benchmarks/quality_pool.py), sharing the machine: wall times are upper "
                  "bounds." if self.info.get("pool_workers") else ""), "",
               "## Machine", "", machine_markdown(self.info), ""]
        notes = RESULTS / f"quality_{a.tag}_notes.md"  # hand-written reading of the figures
        if notes.is_file():
            md += [notes.read_text().rstrip(), ""]
        return "\n".join(md), groups, errors

    def paired(self, task: str, x: str, y: str) -> list[float]:
        sx, sy = self.selected(task, x), self.selected(task, y)
        return [100 * (sx[s]["test_top1"] - sy[s]["test_top1"]) for s in sorted(sx) if s in sy]


def joins_of(variants: list[str], among: list[str] = ()) -> tuple[tuple[str, str], ...]:
    """The (x, y) pairs whose paired difference x - y the report gives, in its order."""
    joins = ((VAL_BEST, _lora_of(among[0])),) if among else ()
    joins += tuple((v, v.partition("@")[0]) for v in variants if "@" in v)
    # each option variant against the authors' default and against LoRA at its rank
    joins += tuple(p for v in variants if "+" in v for p in (
        (v, v.partition("+")[0]), (v, _lora_of(v))))
    # an ablation given its own grid in --variants, against the variant it ablates and
    # LoRA; an option added to another (+klr+b4), against that one (+klr) when in the study
    joins += tuple(p for v in variants if ":" in v
                   for p in ((v, v.partition(":")[0]), (v, _lora_of(v))))
    joins += tuple((v, v.rpartition("+")[0]) for v in variants
                   if v.count("+") > 1 and v.rpartition("+")[0] in variants)
    # every SNELLA variant against the authors' SNELL (SNELLA without its allocator) and
    # against the `fast` recipe's SNELLA (snella-r8+klr) when it is in the study
    joins += tuple((v, "snell-r8") for v in variants if v.startswith("snella-r8"))
    if "snella-r8+klr" in variants:
        joins += tuple((v, "snella-r8+klr") for v in variants
                       if v.startswith("snella-r8+") and v != "snella-r8+klr")
    return tuple(dict.fromkeys((("snella-r8", "lora-r8"), ("snella-r32", "lora-r32"), *joins,
                                ("snella-r8", "full"), ("snella-r32", "full"),
                                ("snell-r8", "lora-r8"))))


def pooled_rows(studies: list[tuple[str, dict, int]], tasks: list[str],
                variants: list[str], among: list[str] = ()) -> list[list[str]]:
    """Rows of paired differences pooled over replicate studies (``(tag, runs, first seed)``
    each, lr selected within each study): per pair and task, each study's mean, the pooled
    mean ± std over every seed, n, and on how many seeds x was ahead."""
    rows = []
    for t in tasks:
        for x, y in joins_of(variants, among):
            per, pooled = [], []
            for _tag, runs, first in studies:
                sx, sy = (select_runs(runs, t, v, first, among=among) for v in (x, y))
                d = [100 * (sx[s]["test_top1"] - sy[s]["test_top1"]) for s in sorted(sx)
                     if s in sy]
                per.append(f"{statistics.fmean(d):+.2f} ({len(d)})" if d else "—")
                pooled += d
            if len(pooled) > 1 and sum(p != "—" for p in per) > 1:
                rows.append([t, f"{x} - {y}", *per,
                             f"{statistics.fmean(pooled):+.2f} ± {statistics.stdev(pooled):.2f}",
                             str(len(pooled)), f"{sum(d > 0 for d in pooled)} of {len(pooled)}"])
    return rows


def val_best(runs: dict, task: str, among: list[str], first_seed: int) -> str | None:
    """The candidate whose selected run on ``first_seed`` has the best val accuracy (ties: the
    first given); None while a candidate has no selected run there yet."""
    best = None
    for v in among:
        sel = select_runs(runs, task, v, first_seed)
        if first_seed not in sel:
            return None
        if best is None or sel[first_seed]["best_val_acc"] > best[0]:
            best = (sel[first_seed]["best_val_acc"], v)
    return best[1] if best else None


def select_runs(runs: dict, task: str, variant: str, first_seed: int,
                lr_select: str = "first-seed", among: list[str] = ()) -> dict[int, dict]:
    """Per seed, the tested run of ``variant`` whose lr val selected: with ``first-seed``, the
    lr :func:`pick_lr` picks on ``first_seed``'s grid, reused by the other seeds. ``variant``
    :data:`VAL_BEST` is the candidate of ``among`` that :func:`val_best` picks."""
    if variant == VAL_BEST:
        variant = val_best(runs, task, among, first_seed)
        if variant is None:
            return {}
    by_seed: dict[int, list] = {}
    for r in runs.values():
        if r["task"] == task and r["variant"] == variant:
            by_seed.setdefault(r["seed"], []).append(r)
    if lr_select == "every-seed" or ":" in variant:
        sel = {s: max(rs, key=lambda r: (r["best_val_acc"], -r["lr"]))
               for s, rs in by_seed.items()}
    else:
        if first_seed not in by_seed:
            return {}
        lr = pick_lr(by_seed[first_seed])  # the search's own rule (failed runs are no pick)
        sel = {s: r for s, rs in by_seed.items() for r in rs if r["lr"] == lr}
    return {s: r for s, r in sel.items() if "test_top1" in r}  # a search still going


def failed(row: dict) -> bool:
    """A run that never left chance (train/callbacks.py's warning): not a candidate."""
    return any(w.startswith(NEVER_LEFT_CHANCE) for w in row.get("warnings", ()))


def pick_lr(rows: list[dict]) -> float:
    """The lr of the best-val run (ties: the lower lr); runs that never left chance are not
    candidates, and when every run failed the lowest lr is "best", so the grid widens below it
    (a lower lr is the fix the warning names), instead of picking the luckiest chance run."""
    ok = [r for r in rows if not failed(r)]
    if not ok:
        return min(r["lr"] for r in rows)
    return max(ok, key=lambda r: (r["best_val_acc"], -r["lr"]))["lr"]


def widened(grid: list[float], best: float) -> list[float] | None:
    """``grid`` plus the next value beyond ``best`` when ``best`` is its lowest or highest
    value (the step between its two nearest values, in ratio), else None (an interior pick)."""
    g = sorted(grid)
    if len(g) < 2 or g[0] < best < g[-1]:
        return None
    if best == g[-1]:
        return g + [float(f"{g[-1] * g[-1] / g[-2]:.3g}")]
    return [float(f"{g[0] * g[0] / g[1]:.3g}")] + g


def run_ablation(study: Study, a, grids: dict) -> None:
    task = a.task_list[0]
    ab = a.ablation_base
    if not study.selected(task, ab):
        study.study(task, ab, grids)
    lr = next(iter(study.selected(task, ab).values()))["lr"]
    for abl in a.ablation_list:
        log(f"{task} / {ab}:{abl} at lr {lr:g}")
        study.study(task, f"{ab}:{abl}", grids, lr=lr)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    prev = RESULTS / f"quality_{a.tag}.json"
    if a.report_only:
        if not prev.is_file():
            print(f"--report-only: {prev} does not exist; give the --tag of a finished or "
                  "partial study", file=sys.stderr)
            return 2
        recorded = json.loads(prev.read_text())
        for k, v in recorded["args"].items():  # the study as it was run
            if k not in ("report_only", "resume", "tag", "pool_with", "pool_list",
                         "select_among", "select_list"):
                setattr(a, k, v)
    if set(a.select_list) - set(a.variant_list):
        print(f"--select-among {a.select_among}: "
              f"{sorted(set(a.select_list) - set(a.variant_list))} not in the study's variants "
              f"{a.variant_list}; give two or more of them", file=sys.stderr)
        return 2
    a.replicates = []  # (tag, runs, first seed) of each --pool-with study
    for tag in a.pool_list:
        rec = json.loads((RESULTS / f"quality_{tag}.json").read_text())
        seeds = [int(x) for x in str(rec["args"]["seeds"]).split(",")]
        if set(seeds) & set(a.seed_list):
            print(f"--pool-with {tag}: its seeds {seeds} overlap this study's {a.seed_list} "
                  "(a seed counted twice); pool studies run on other seeds", file=sys.stderr)
            return 2
        a.replicates.append((tag, rec["runs"], seeds[0]))
    grids = dict(DEFAULT_LRS)
    if a.lrs:
        grids.update({k: tuple(v) for k, v in json.loads(a.lrs).items()})
    info = machine_info()
    if a.report_only:
        final = bool(recorded.get("complete"))
        study = Study(a, None, info)
        study.grids = grids
        study.save(final=final)
        print("\n" + study.report(final)[0])
        return 0
    log(f"backbone {a.model} at {a.img_size}px; tasks {a.task_list}; seeds {a.seed_list}")
    base = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size)
    study = Study(a, base, info)
    study.grids = grids
    # variants in the order given (put the question first: lora-r8,snella-r8,...); the
    # ablation runs once --ablation-after is done on every task (it needs snella-r8's lr), so a
    # run stopped by a time limit has the most important rows
    ablation_done = not a.ablation_list
    for v in a.variant_list:
        for task in a.task_list:
            log(f"{task} / {v}")
            study.study(task, v, grids)
        if v == a.ablation_after and not ablation_done:
            run_ablation(study, a, grids)
            ablation_done = True
    if not ablation_done:
        run_ablation(study, a, grids)
    study.save(final=True)
    print("\n" + study.report(True)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
