"""Training-step time of LoRA vs SNELL vs SNELLA, CPU or CUDA (one AdamW step, random batch).

Run:  .venv/bin/python benchmarks/profile_snell_step.py [--reps 5] [--threads 2]
          [--model dinov2_small.imgfocus] [--img-size 112] [--batch 32] [--device cpu|cuda]
          [--profile snella] [--json out.json]

Every method's model is built once; each repetition times one step of every method in turn
(interleaved, so load from other processes hits all methods alike; on CUDA each step is
synchronised); medians after two warm-up steps, and ratios to LoRA. Variants:

- ``lora``: PEFT LoRA r = 8 (the registry's baseline);
- ``snell`` / ``snella``: r = 8, sparsity 0.7 target, default config (fused path, no branch
  dropout / drop-path), eager kernels (``TRIMTUNE_COMPILE=0`` during their steps);
- ``snella-compiled``: the same with the torch.compile path on every unit
  (``TRIMTUNE_COMPILE=1`` during its steps: Inductor C++ on the CPU, Triton on CUDA);
- ``snella-paper``: the authors' branch dropout 0.1 / drop-path 0.1 (unfused path).

``--profile NAME[,NAME]`` profiles one step of each named variant (torch.profiler): top ops by
self time, and on CUDA the number of GPU kernels per step and their summed time against the
step's wall time (a step whose kernels fill a small share of its wall time is launch-bound).
Prints markdown; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch

from trimtune.train_step import build_train_step

VARIANTS = {
    "lora": ("lora", {}, None),
    "snell": ("snell", {}, "0"),
    "snella": ("snella", {}, "0"),
    "snella-compiled": ("snella", {}, "1"),
    "snell-compiled": ("snell", {}, "1"),
    "snella-paper": ("snella", {"dropout": 0.1, "drop_path": 0.1}, "0"),
}


@contextmanager
def compile_setting(value: str | None):
    """``TRIMTUNE_COMPILE`` = ``value`` inside (read by trimtune.tuners.snell.compiled per call)."""
    old = os.environ.get("TRIMTUNE_COMPILE")
    if value is not None:
        os.environ["TRIMTUNE_COMPILE"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRIMTUNE_COMPILE", None)
        else:
            os.environ["TRIMTUNE_COMPILE"] = old


def build(name: str, args, device: torch.device):
    """One synchronised training step of variant ``name`` (the benchmarks' step builder,
    :func:`trimtune.train_step.build_train_step`, under the variant's compile setting)."""
    method, kw, comp = VARIANTS[name]
    _, train_step = build_train_step(args.model, method=method, r=args.rank,
                                     batch_size=args.batch, img_size=args.img_size,
                                     pretrained=not args.random_init, target_sparsity=0.7,
                                     device=str(device), method_kwargs=kw)

    def step() -> None:
        with compile_setting(comp):
            train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def profile_step(step, device: torch.device, rows: int = 15) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
    wall = time.perf_counter() - t0
    ev = prof.key_averages()
    out = {"wall_ms_profiled": wall * 1e3}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["cuda_kernels"] = len(kernels)
        out["cuda_kernel_ms"] = sum(e.device_time for e in kernels) / 1e3
        key = "self_device_time_total"
    else:
        key = "self_cpu_time_total"
    out["top"] = [(e.key, getattr(e, key) / 1e3, e.count)
                  for e in sorted(ev, key=lambda e: -getattr(e, key))[:rows]]
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    return out, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus",
                    help="timm name or offline-zoo name (default: %(default)s)")
    ap.add_argument("--random-init", action="store_true",
                    help="random weights (speed does not depend on them; default: pretrained)")
    ap.add_argument("--img-size", type=int, default=112, help="default: %(default)s")
    ap.add_argument("--batch", type=int, default=32, help="default: %(default)s")
    ap.add_argument("--rank", type=int, default=8, help="default: %(default)s")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per variant "
                    "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads "
                    "(default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--variants", default="lora,snell,snella,snella-paper",
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: %(default)s)")
    ap.add_argument("--profile", default=None, help="comma-separated variants to profile")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: use {', '.join(VARIANTS)}")
    steps = {n: build(n, args, device) for n in names}
    first: dict[str, float] = {}
    for n, s in steps.items():  # warm-up (the first compiled call compiles: timed apart)
        t = time.perf_counter()
        s()
        first[n] = time.perf_counter() - t
        s()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} threads"
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, r={args.rank}, {dev}, "
          f"{args.reps} interleaved reps (median), torch {torch.__version__}")
    print("| variant | step ms (median) | min | max | x lora | first step s |")
    print("|---|---|---|---|---|---|")
    for n in names:
        ratio = med[n] / med["lora"] if "lora" in med else float("nan")
        print(f"| {n} | {med[n] * 1e3:.1f} | {min(times[n]) * 1e3:.1f} | "
              f"{max(times[n]) * 1e3:.1f} | {ratio:.2f} | {first[n]:.1f} |")
    result = {"settings": vars(args), "device": dev,
              "median_ms": {n: v * 1e3 for n, v in med.items()},
              "times_ms": {n: [x * 1e3 for x in v] for n, v in times.items()},
              "first_step_s": first, "profiles": {}}
    for n in (args.profile.split(",") if args.profile else []):
        prof, table = profile_step(steps[n], device)
        result["profiles"][n] = prof
        extra = (f", {prof['cuda_kernels']} CUDA kernels, {prof['cuda_kernel_ms']:.1f} ms of "
                 "kernel time" if "cuda_kernels" in prof else "")
        print(f"\n### profile: {n} (one step, {prof['wall_ms_profiled']:.1f} ms under the "
              f"profiler{extra})\n")
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
