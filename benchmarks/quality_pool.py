"""bench_quality's protocol with its runs spread over parallel worker processes (a GPU machine).

On a GPU the SNELL / SNELLA steps of a ViT-S are launch-bound (results/speed_cuda.md), so one
process leaves the card mostly idle; several processes, one run each, fill it. The protocol is
bench_quality's, unchanged: per (group, variant) the lr grid runs on the first seed, the best
val accuracy picks the lr (widened past an edge that wins, up to ``--widen`` times), then the
other seeds run at the pick. Every run is one ``bench_quality.py`` process (``--seeds S --lrs
{method: [lr]} --widen 0``), whose row is merged into the group's ``quality_<tag>.json``. A grid
run's test figure is computed by that process but dropped from the merged JSON unless its lr is
the pick: nothing reported was chosen by the test set, and nothing reported is a test figure of
an lr that val did not choose.

Groups (``--plan``) run in their order of priority: free workers take the next ready run of the
first unfinished group. At ``--deadline-s`` the running processes are stopped (SIGTERM: a run
stops without a record) and what finished is written, marked partial.

Run (the lent GPU, after ``benchmarks/device_pack.py unpack``):
    python3 benchmarks/quality_pool.py --plan i22-gpu --workers 10 --device cuda --deadline-s 470
Then here: ``python benchmarks/bench_quality.py --report-only --tag <group tag>`` writes each
group's .md and .png from its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quality  # noqa: E402
from _common import RESULTS, log, machine_info  # noqa: E402

GRID3 = {"lora": [1e-3, 3e-3, 1e-2], "snella": [1e-3, 3e-3, 1e-2], "snell": [1e-3, 3e-3, 1e-2],
         "linear": [1e-3, 3e-3, 1e-2], "full": [1e-5, 3e-5, 1e-4]}

#: plan -> groups in priority order; a group is one bench_quality study (one task)
PLANS = {
    "i22-gpu": [
        # issue 22's budget curve: the 112 px point (the `full` preset's setting) ...
        dict(tag="i22_112px_cuda", task="fashion-mnist:1k", img_size=112, epochs=10,
             variants=["lora-r8", "snella-r8+klr", "snella-r8"]),
        # ... the 30-epoch point at 56 px
        dict(tag="i22_30ep_cuda", task="fashion-mnist:1k", img_size=56, epochs=30,
             variants=["lora-r8", "snella-r8+klr"]),
        # which component costs SNELLA its points at 10 epochs, each with its own lr grid
        dict(tag="i22_ladder_10ep_cuda", task="fashion-mnist:1k", img_size=56, epochs=10,
             variants=["lora-r8", "snella-r8+klr", "snella-r8+klr:inner-dense",
                       "snella-r8+klr:no-sparsity", "snella-r8+klr:no-allocator"]),
        dict(tag="i22_112px_cuda", task="fashion-mnist:1k", img_size=112, epochs=10,
             variants=["full", "snell-r8", "linear"]),
    ],
    # the 112 px point again after the same-seed fix (every run's head now seeded): LoRA,
    # SNELL (the authors'), and the `full` / `linear` rows;
    # grids centred on the earlier picks (LoRA 1e-3 on the GPU, SNELL 1e-2 at 10 CPU epochs)
    "i22-gpu2": [
        dict(tag="i22_112px_v2_cuda", task="fashion-mnist:1k", img_size=112, epochs=10,
             variants=["lora-r8", "snell-r8", "full", "linear"],
             lrs={"lora": [1 / 3000, 1e-3, 3e-3], "snell": [1 / 300, 1e-2, 1 / 30],
                  "full": [1e-5, 3e-5, 1e-4], "linear": [3e-3, 1e-2, 3e-2]}),
    ],
    # a few seconds on a CPU: checks the pool end to end (tests and the device script's dry run)
    "smoke": [
        dict(tag="pool_smoke", task="digits:200", img_size=28, epochs=1,
             variants=["linear", "snella-r8"], seeds=[0, 1],
             lrs={"linear": [1e-3, 1e-2], "snella": [1e-3, 1e-2]}),
    ],
}


@dataclass
class Chain:
    """One (group, variant): its seed-0 grid, then its other seeds at the pick."""

    group: dict
    variant: str
    grid: list[float]
    seeds: list[int]
    rows: dict = field(default_factory=dict)  # (seed, lr) -> row
    running: set = field(default_factory=set)  # (seed, lr)
    pick: float | None = None
    widened: int = 0

    @property
    def method(self) -> str:
        return bench_quality.VARIANTS[self.variant.partition(":")[0]]["method"]

    def ready(self, widen: int) -> list[tuple[int, float]]:
        """Runs that can start now."""
        s0 = self.seeds[0]
        if self.pick is None:
            todo = [(s0, lr) for lr in self.grid if (s0, lr) not in self.rows
                    and (s0, lr) not in self.running]
            if todo or any(k[0] == s0 for k in self.running):
                return todo
            vals = {lr: self.rows[(s0, lr)]["best_val_acc"] for lr in self.grid}
            best = max(vals, key=lambda lr: (vals[lr], -lr))
            more = bench_quality.widened(self.grid, best)
            if more is not None and self.widened < widen:
                self.widened += 1
                self.grid = more
                return self.ready(widen)
            self.pick = best
        return [(s, self.pick) for s in self.seeds[1:] if (s, self.pick) not in self.rows
                and (s, self.pick) not in self.running]

    def speculative(self) -> list[tuple[int, float]]:
        """While the first seed's grid runs: the other seeds at every grid lr, for workers that
        would idle (``--speculate``). Those at the lr val picks are kept; the rest are dropped
        unreported, so the protocol is unchanged and the chain is one run deep, not two."""
        if self.pick is not None:
            return []
        return [(s, lr) for lr in self.grid for s in self.seeds[1:]
                if (s, lr) not in self.rows and (s, lr) not in self.running]

    def done(self) -> bool:
        return self.pick is not None and all((s, self.pick) in self.rows for s in self.seeds)


def bench_args(group: dict, variants: list[str], seeds: list[int], lrs: dict, a) -> list[str]:
    """bench_quality's command-line for ``group`` (the whole study, or one run of it)."""
    return ["--tasks", group["task"], "--variants", ",".join(variants),
            "--seeds", ",".join(map(str, seeds)), "--epochs", str(group["epochs"]),
            "--img-size", str(group["img_size"]), "--test-images", "0",
            "--lrs", json.dumps(lrs), "--device", a.device]


class Pool:
    def __init__(self, a) -> None:
        self.a = a
        self.scratch = Path(a.scratch or tempfile.mkdtemp(prefix="quality_pool_"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.groups: dict[str, dict] = {}
        self.chains: list[Chain] = []
        for g in PLANS[a.plan]:
            seeds = g.get("seeds", [0, 1, 2, 3, 4])
            prev = self.groups.setdefault(g["tag"], dict(g, variants=[]))
            prev["variants"] += g["variants"]
            for v in g["variants"]:
                c = Chain(g, v, [], seeds)
                c.grid = list(g.get("lrs", GRID3)[c.method])
                self.chains.append(c)
        self.procs: dict[subprocess.Popen, tuple[Chain, int, float, str]] = {}
        self.info = machine_info()
        self.n = 0
        self.failed = 0

    def launch(self, c: Chain, seed: int, lr: float) -> None:
        self.n += 1
        tag = f"pool{self.n}"
        argv = [sys.executable, str(HERE / "bench_quality.py"), *bench_args(
            c.group, [c.variant], [seed], {c.method: [lr]}, self.a),
            "--widen", "0", "--threads", str(self.a.threads), "--tag", tag,
            "--work", str(self.scratch / "work" / tag)]
        env = dict(os.environ, TRIMTUNE_RESULTS=str(self.scratch / "results"),
                   PYTHONUNBUFFERED="1")
        logf = open(self.scratch / f"{tag}.log", "w")
        p = subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT)
        c.running.add((seed, lr))
        self.procs[p] = (c, seed, lr, tag)
        log(f"start {tag}: {c.group['tag']} {c.variant} seed {seed} lr {lr:g}")

    def reap(self) -> None:
        for p in [p for p in self.procs if p.poll() is not None]:
            c, seed, lr, tag = self.procs.pop(p)
            c.running.discard((seed, lr))
            path = self.scratch / "results" / f"quality_{tag}.json"
            if p.returncode != 0 or not path.is_file():
                log(f"FAILED {tag} ({c.variant} seed {seed} lr {lr:g}, exit {p.returncode}): "
                    f"see {self.scratch / (tag + '.log')}")
                tail = (self.scratch / f"{tag}.log").read_text()[-1500:]
                print(tail, file=sys.stderr)
                self.failed += 1
                c.rows[(seed, lr)] = {"failed": True, "best_val_acc": -1.0}
                continue
            runs = json.loads(path.read_text())["runs"]
            (row,) = runs.values()
            c.rows[(seed, lr)] = row
            log(f"done {tag}: {c.variant} seed {seed} lr {lr:g} val {row['best_val_acc']:.4f} "
                f"test {row.get('test_top1', float('nan')):.4f}, {row['train_wall_s']:.0f}s")
            self.write()

    def write(self) -> None:
        """Each group's ``quality_<tag>.json``: what val chose, complete or not."""
        for tag, g in self.groups.items():
            chains = [c for c in self.chains if c.group["tag"] == tag]
            runs = {}
            for c in chains:
                for (seed, lr), row in c.rows.items():
                    if row.get("failed"):
                        continue
                    row = dict(row)
                    if seed != c.seeds[0] and lr != c.pick:
                        continue  # a speculative run at an lr val did not choose
                    if c.pick is None or lr != c.pick:
                        row.pop("test_top1", None)  # a grid run val did not choose
                        row.pop("test_wall_s", None)
                    runs[f"{g['task']}|{c.variant}|{seed}|{lr:g}"] = row
            if not runs:
                continue
            lrs = {}
            for c in chains:
                lrs.setdefault(c.method, set()).update(c.grid)
            seeds = chains[0].seeds
            args = vars(bench_quality.parse_args(
                bench_args(g, g["variants"], seeds, {m: sorted(v) for m, v in lrs.items()},
                           self.a) + ["--widen", str(self.a.widen), "--tag", tag]))
            data = {"args": args, "machine": dict(self.info, pool_workers=self.a.workers),
                    "runs": runs, "compressed_backbones": {},
                    "complete": all(c.done() for c in chains)}
            out = Path(self.a.results_dir or RESULTS)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".quality_{tag}.json.tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
            tmp.replace(out / f"quality_{tag}.json")

    def run(self) -> int:
        t0 = time.time()
        while True:
            self.reap()
            if all(c.done() for c in self.chains):
                break
            if time.time() - t0 > self.a.deadline_s:
                log(f"deadline {self.a.deadline_s:.0f}s: stopping {len(self.procs)} runs")
                for p in self.procs:
                    p.send_signal(signal.SIGTERM)
                for p in list(self.procs):
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                self.procs.clear()
                break
            if self.failed and not any(
                    not r.get("failed") for c in self.chains for r in c.rows.values()):
                log("the first runs failed and none succeeded: stopping (see above)")
                for p in self.procs:
                    p.kill()
                self.procs.clear()
                break
            for c in self.chains:  # priority order
                for seed, lr in c.ready(self.a.widen):
                    if len(self.procs) >= self.a.workers:
                        break
                    self.launch(c, seed, lr)
            for c in self.chains if self.a.speculate else []:
                for seed, lr in c.speculative():
                    if len(self.procs) >= self.a.workers:
                        break
                    self.launch(c, seed, lr)
            time.sleep(1.0)
        self.write()
        done = sum(c.done() for c in self.chains)
        log(f"{done} of {len(self.chains)} (group, variant) studies complete in "
            f"{time.time() - t0:.0f}s; {self.failed} runs failed")
        return 0 if not self.failed else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=sorted(PLANS), required=True,
                    help="the groups to run, in priority order")
    ap.add_argument("--workers", type=int, default=4,
                    help="runs at once (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per run (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--widen", type=int, default=3,
                    help="widenings of a grid whose pick is at an edge (default: %(default)s)")
    ap.add_argument("--speculate", action="store_true",
                    help="run the other seeds at every grid lr while the first seed's grid runs, "
                         "on workers that would idle; the unpicked ones are dropped (default: "
                         "off)")
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="stop all runs after this many seconds (default: none)")
    ap.add_argument("--scratch", default=None,
                    help="run folders and logs (default: a new temporary folder)")
    ap.add_argument("--results-dir", default=None,
                    help="where the groups' quality_<tag>.json go (default: benchmarks/results)")
    a = ap.parse_args(argv)
    if a.workers < 1 or a.threads < 1:
        ap.error("--workers and --threads must be >= 1")
    return Pool(a).run()


if __name__ == "__main__":
    raise SystemExit(main())
