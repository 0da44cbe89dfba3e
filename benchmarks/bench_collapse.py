"""Why SNELLA collapses at a high learning rate (issue 22): the kernel's scalars, step by step.

SNELLA's mixture kernel ``dW = K + alpha softmax(K / gamma) + beta`` has three learnable scalars
per unit. AdamW moves every parameter by about ``lr`` per step whatever its gradient's size,
and ``beta`` is added to every one of the d_in x d_out entries of the update (then squared by
the sparsifier): at lr 1e-2 it reaches +-0.1 in ten steps, a shift of ~0.01 on every weight of
the layer, as large as the pre-trained weights themselves. This script trains SNELLA on the
zoo's DINOv2-S (real weights, Fashion-MNIST 1k with its @val split, no warm-up: ``tt.finetune``'s
defaults) and records, after every optimizer step, the range of alpha / gamma / beta over the
72 units and the largest factor entry, beside the loss and the validation accuracy, for the
authors' behaviour and for ``kernel_lr_scale`` (the kernel's scalars at 1/100 of the lr).

Run:
    .venv/bin/python benchmarks/bench_collapse.py --lrs 0.01,0.03 --max-steps 50
Writes benchmarks/results/collapse_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, machine_info, machine_markdown, md_table, write_results  # noqa: E402

import trimtune as tt  # noqa: E402
from trimtune.tuners import registry  # noqa: E402

VARIANTS = {"authors": {}, "kernel_lr_scale=0.01": {"kernel_lr_scale": 0.01}}


class Spy:
    """A training callback: per optimizer step, the kernel scalars' range and the largest
    factor entry over every SNELLA unit."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def after_optimizer_step(self, state) -> None:
        vals: dict[str, list[float]] = {"alpha": [], "gamma": [], "beta": []}
        fmax = 0.0
        for n, p in state.model.named_parameters():
            leaf = n.rsplit(".", 1)[-1]
            if ".kernel." in n and leaf in vals:
                vals[leaf].append(p.item())
            elif leaf in ("snell_A", "snell_B"):
                fmax = max(fmax, p.detach().abs().max().item())
        self.steps.append({"step": state.step, **{k: [min(v), max(v)] for k, v in vals.items()},
                           "factor_max": fmax})


def one(a, variant: str, lr: float) -> dict:
    spy = Spy()
    orig = registry.callbacks
    registry.callbacks = lambda model: [*orig(model), spy]
    try:
        torch.manual_seed(0)
        model = tt.create_backbone(a.model, num_classes=10, img_size=a.img_size)
        out = Path(a.work) / f"{variant}_{lr:g}"
        cfg = tt.FinetuneConfig(method="snella", method_kwargs=dict(VARIANTS[variant]),
                                train=tt.TrainConfig(lr=lr, epochs=a.epochs, batch_size=32,
                                                     max_steps=a.max_steps, seed=a.seed,
                                                     out_dir=out, overwrite=True,
                                                     progress=False, threads=a.threads))
        t0 = time.time()
        r = tt.finetune(model, a.data, cfg, eval_data=a.val_data)
    finally:
        registry.callbacks = orig
    losses = [h for h in r.history if "loss" in h]
    vals = [round(h["val_acc"], 4) for h in r.history if "val_acc" in h]
    at = {s["step"]: s for s in spy.steps}
    return {"variant": variant, "lr": lr, "loss_step1": losses[0]["loss"],
            "loss_max": max(h["loss"] for h in losses), "loss_last": losses[-1]["loss"],
            "val_per_epoch": vals, "beta_step10": at.get(10, spy.steps[-1])["beta"],
            "beta_last": spy.steps[-1]["beta"], "factor_max_last": spy.steps[-1]["factor_max"],
            "warnings": r.warnings, "wall_s": time.time() - t0, "steps": spy.steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--data", default="fashion-mnist:1k")
    ap.add_argument("--val-data", default="fashion-mnist:1k@val")
    ap.add_argument("--lrs", default="0.01,0.03", help="comma list of learning rates")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    ap.add_argument("--epochs", type=int, default=5, help="schedule length (cosine)")
    ap.add_argument("--max-steps", type=int, default=50, help="stop after this many steps")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_collapse")
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args(argv)
    lrs = [float(x) for x in a.lrs.split(",") if x.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not lrs or any(x <= 0 for x in lrs):
        ap.error(f"--variants from {list(VARIANTS)} and --lrs positive numbers (got {bad or lrs})")
    info = machine_info()
    rows = []
    for lr in lrs:
        for v in variants:
            log(f"{v} at lr {lr:g}")
            rows.append(one(a, v, lr))
    fmt = lambda r: f"{r[0]:+.3f} .. {r[1]:+.3f}"  # noqa: E731
    table = [[r["variant"], f"{r['lr']:g}", f"{r['loss_step1']:.2f}", f"{r['loss_max']:.2f}",
              f"{r['loss_last']:.2f}", " / ".join(f"{v:.3f}" for v in r["val_per_epoch"]),
              fmt(r["beta_step10"]), fmt(r["beta_last"]), f"{r['factor_max_last']:.3f}",
              "yes" if r["warnings"] else "no"] for r in rows]
    md = [f"# SNELLA at a high learning rate: the kernel's scalars ({a.model}, {a.img_size} px)",
          "", f"`{' '.join(['python', 'benchmarks/bench_collapse.py', *(argv or sys.argv[1:])])}`"
          f" — {a.data} (val {a.val_data}), r = 8, batch 32, seed {a.seed}, a {a.epochs}-epoch "
          f"cosine schedule without warm-up (tt.finetune's defaults) stopped after "
          f"{a.max_steps} steps, {a.threads} threads.", "",
          md_table(["variant", "lr", "loss step 1", "loss max (logged)", "loss last",
                    "val acc per epoch", "beta range, step 10", "beta range, last",
                    "max |factor|", "warned"], table), "",
          "beta is added to every entry of a unit's d_in x d_out update before the sparsifier "
          "squares it; the pre-trained weights of DINOv2-S are ~0.02-0.05 in size.", "",
          "## Machine", "", machine_markdown(info), ""]
    write_results(f"collapse_{a.tag}", "\n".join(md), {"args": vars(a), "machine": info,
                                                       "rows": rows})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
