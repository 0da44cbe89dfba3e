"""How many SNELLA units the allocator switched off, read from finished run folders.

A unit is "off" when its sparsity is above 0.99 (it keeps a few entries at most, so its
update and its factors' gradient are ~0). For each run folder (a ``trimtune.finetune`` /
``bench_quality.py`` run with a SNELLA allocator) this reads the allocator history kept in
``checkpoint/state.pt`` and reports the units off after the first reallocation and at the end,
and the mean final sparsity per layer kind (q, k, v of the fused qkv; proj; fc1; fc2).
Writes ``benchmarks/results/alloc_units_off_<tag>.{md,json}``.

Run (after the bench_quality runs it reads; ``--work`` of that command):
    .venv/bin/python benchmarks/alloc_units_off.py --tag cpu \
        runs/alloc_check/mnist-5k_1k/snella-r8+fixed+pw/s0_0.0333 ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, write_results  # noqa: E402

OFF = 0.99
QKV = {"0": "q", "1": "k", "2": "v"}


def kind(unit: str) -> str:
    """``blocks.3.attn.qkv.snell_units.default.1`` -> ``k``; ``blocks.3.mlp.fc1...`` -> ``fc1``."""
    parts = unit.split(".")
    if "qkv" in parts:
        return QKV.get(parts[-1], "qkv")
    for name in ("proj", "fc1", "fc2"):
        if name in parts:
            return name
    return parts[-1]


def history(run: Path) -> list[tuple[int, dict[str, float]]]:
    """The allocator's ``(step, {unit: sparsity})`` history of a run folder."""
    state = torch.load(run / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    for cb in state.get("callbacks", {}).values():
        if isinstance(cb, dict) and "history" in cb:
            return cb["history"]
    raise SystemExit(f"{run}: no SNELLA allocator history in checkpoint/state.pt: give the "
                     "folder of a finished snella run")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (each with checkpoint/state.pt)")
    ap.add_argument("--tag", default="cpu", help="writes alloc_units_off_<tag>.{md,json}")
    a = ap.parse_args(argv)
    rows, data = [], {}
    kinds = ("q", "k", "v", "proj", "fc1", "fc2")
    for r in map(Path, a.runs):
        if not (r / "checkpoint" / "state.pt").is_file():
            ap.error(f"{r} has no checkpoint/state.pt: give a finished run folder")
        h = history(r)
        first = h[1][1] if len(h) > 1 else h[0][1]
        last = h[-1][1]
        by = {k: [s for u, s in last.items() if kind(u) == k] for k in kinds}
        entry = {"units": len(last), "off_first": sum(s > OFF for s in first.values()),
                 "off_end": sum(s > OFF for s in last.values()),
                 "final_mean_sparsity": {k: statistics.fmean(v) for k, v in by.items() if v}}
        data["/".join(r.parts[-3:])] = entry
        means = entry["final_mean_sparsity"]
        rows.append(["/".join(r.parts[-3:]), entry["units"], entry["off_first"],
                     entry["off_end"]] + [f"{means[k]:.2f}" if k in means else "—"
                                          for k in kinds])
    md = "\n".join([
        "# SNELLA units switched off by the allocator", "",
        f"A unit is off when its sparsity > {OFF}. `python benchmarks/alloc_units_off.py "
        f"--tag {a.tag} {' '.join(a.runs)}`", "",
        md_table(["run", "units", "off after 1st realloc", "off at end"]
                 + [f"{k} final sparsity" for k in kinds], rows), ""])
    print(md)
    write_results(f"alloc_units_off_{a.tag}", md, {"runs": data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
