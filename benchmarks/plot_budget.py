"""Accuracy against training budget: one curve per variant, mean and std over paired seeds.

Reads the JSON of several ``bench_quality.py`` runs that differ only in ``--epochs`` (each
``quality_<tag>.json``), takes each variant's selected run per seed (its lr chosen on the first
seed's val split, as the report does) and plots test top-1 against epochs with error bars;
writes ``benchmarks/results/budget_<out>.{md,png}``.

Run (after e.g. ``--epochs 3 --tag i22_cpu`` and ``--epochs 10 --tag i22_10ep_cpu``):
    .venv/bin/python benchmarks/plot_budget.py --tags i22_cpu,i22_10ep_cpu \
        --task fashion-mnist:1k --variants lora-r8,snella-r8,snella-r8+klr --out i22_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, md_table  # noqa: E402
from bench_quality import select_runs as selected  # noqa: E402  (the report's own selection)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tags", required=True, help="comma list of quality_<tag>.json tags")
    ap.add_argument("--task", default="fashion-mnist:1k")
    ap.add_argument("--variants", default="lora-r8,snella-r8")
    ap.add_argument("--out", default="cpu", help="writes budget_<out>.{md,png}")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    points: dict[str, list[tuple[int, float, float, int, str]]] = {v: [] for v in variants}
    paired: list[list[str]] = []  # each variant minus the first, per budget, on the same seeds
    for tag in [t for t in a.tags.split(",") if t]:
        path = RESULTS / f"quality_{tag}.json"
        if not path.is_file():
            ap.error(f"{path} does not exist: run bench_quality.py --tag {tag} first")
        d = json.loads(path.read_text())
        epochs, seeds = d["args"]["epochs"], d["args"]["seed_list"]
        first = selected(d["runs"], a.task, variants[0], seeds[0])
        for v in variants:
            sel = selected(d["runs"], a.task, v, seeds[0])
            accs = [100 * r["test_top1"] for r in sel.values()]
            common = sorted(set(sel) & set(first))
            if v != variants[0] and common:
                diffs = [100 * (sel[k]["test_top1"] - first[k]["test_top1"]) for k in common]
                paired.append([f"{v} - {variants[0]}", str(epochs),
                               f"{statistics.fmean(diffs):+.2f}",
                               f"{statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "—",
                               " / ".join(f"{x:+.2f}" for x in diffs), str(len(diffs))])
            if accs:
                lr = next(iter(sel.values()))["lr"]
                points[v].append((epochs, statistics.fmean(accs),
                                  statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs),
                                  f"{lr:g}"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = []
    for v, pts in points.items():
        pts.sort()
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=v)
        rows += [[v, str(e), f"{m:.2f} ± {s:.2f}", str(n), lr] for e, m, s, n, lr in pts]
    ax.set_xscale("log")
    ticks = sorted({p[0] for pts in points.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epochs (log scale)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"{a.task}: accuracy vs budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"budget_{a.out}.png", dpi=120)
    md = [f"# Accuracy vs budget on {a.task}", "",
          f"`python benchmarks/plot_budget.py {' '.join(argv or sys.argv[1:])}` — from "
          + ", ".join(f"`quality_{t}.json`" for t in a.tags.split(",") if t) + ".", "",
          md_table(["variant", "epochs", "test % mean ± std", "seeds", "lr"], rows), "",
          "Paired differences (test points, same images and seed):", "",
          md_table(["difference", "epochs", "mean", "std", "per seed", "n"], paired), "",
          f"![budget](budget_{a.out}.png)", ""]
    (RESULTS / f"budget_{a.out}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
