"""ATen ops dispatched per part of one training step, LoRA vs SNELL vs SNELLA (a device-free
proxy for a GPU step's kernel launches: results/step_profile_i22_cuda.md found SNELLA's GPU step
launch-bound, ~9k kernels).

Run:  .venv/bin/python benchmarks/count_step_ops.py [--img-size 56] [--batch 4]
          [--variants lora,snell,snella] [--tag cpu]

Each variant's step (:func:`trimtune.train_step.build_train_step`, allocator callback included)
runs twice to warm up, then once under a ``TorchDispatchMode`` that counts every ATen op by part
(``start``, ``forward``, ``backward``, ``optimizer``, ``callbacks``). Views and ``detach`` are
counted apart (they launch no kernel). Eager kernels (``TRIMTUNE_COMPILE=0``), random init
(counts do not depend on the weights). Writes results/step_ops_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, log, machine_info, md_table  # noqa: E402

PARTS = ("start", "forward", "backward", "optimizer", "callbacks")
#: ops that only re-describe a tensor (no kernel launch)
NO_KERNEL = {"view", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze",
             "expand", "alias", "detach", "as_strided", "slice", "select", "split",
             "split_with_sizes", "unbind", "reshape", "_reshape_alias", "lift_fresh"}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(step) -> dict[str, collections.Counter]:
    seen: dict[str, collections.Counter] = {}

    class Part:
        def __init__(self, name: str) -> None:
            self.name, self.mode = name, Count()

        def __enter__(self):
            self.mode.__enter__()

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            seen[self.name] = self.mode.ops

    step(phase=Part)
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--variants", default="lora,snell,snella")
    ap.add_argument("--tag", default="cpu", help="results file: step_ops_<tag>.*")
    a = ap.parse_args(argv)
    from trimtune.train_step import build_train_step
    from trimtune.tuners.snell.allocator import find_units

    old_compile, old_threads = os.environ.get("TRIMTUNE_COMPILE"), torch.get_num_threads()
    os.environ["TRIMTUNE_COMPILE"] = "0"
    torch.set_num_threads(1)
    try:
        rows, data = _count_all(a, build_train_step, find_units)
    finally:
        torch.set_num_threads(old_threads)
        if old_compile is None:
            os.environ.pop("TRIMTUNE_COMPILE", None)
        else:
            os.environ["TRIMTUNE_COMPILE"] = old_compile
    info = machine_info(argv)
    lines = [f"# ATen ops per training step ({a.model}, {a.img_size} px, batch {a.batch})", "",
             "Ops that launch a kernel (views and detach left out), by part of one step "
             "(`benchmarks/count_step_ops.py`; eager SNELL kernels, allocator included):", "",
             md_table(["variant", "SNELL units", *PARTS, "total", "all ops incl. views"], rows)]
    return finish(f"step_ops_{a.tag}", lines, info, {"args": vars(a), "variants": data})


def _count_all(a, build_train_step, find_units) -> tuple[list, dict]:
    rows, data = [], {}
    for v in [v.strip() for v in a.variants.split(",") if v.strip()]:
        m, step = build_train_step(a.model, method=v, r=8, batch_size=a.batch,
                                   img_size=a.img_size, pretrained=False, device="cpu")
        units = len(find_units(m))
        step()
        step()
        seen = count(step)
        kern = {p: sum(n for op, n in seen.get(p, {}).items() if op not in NO_KERNEL)
                for p in PARTS}
        allops = {p: sum(seen.get(p, {}).values()) for p in PARTS}
        data[v] = {"units": units, "kernel_ops": kern, "all_ops": allops,
                   "top": {p: seen.get(p, collections.Counter()).most_common(6) for p in PARTS}}
        rows.append([v, units, *(kern[p] for p in PARTS), sum(kern.values()),
                     sum(allops.values())])
        log(f"{v}: {rows[-1]}")
    return rows, data


if __name__ == "__main__":
    raise SystemExit(main())
