"""Where a SNELL / SNELLA step spends its time, op by op (issues 7 and 17).

Measurements on the current device (CUDA when available), each interleaved in one process so
that background load hits every variant alike:

1. the exact k-th value of |dW| (a 768 x 3072 mixture-kernel update, sparsity 0.7) by
   ``torch.kthvalue``, the sampled bracket refined exactly, ``torch.sort`` and ``torch.topk``
   of the smaller side (``sparsifier.kth_smallest``);
2. forward + backward of one fused ``SnellLinear`` (768 -> 3072, mixture kernel, r = 8): the
   compiled path (``trimtune.tuners.snell.compiled``), the eager closed-form backward
   (``autograd.delta_vjp``) and autograd through the recomputed update;
3. for every ``--models`` x ``--batches``: one AdamW training step
   (``trimtune.train_step.build_train_step``, SNELLA allocator included) of PEFT lora, snella on the
   eager path (``TRIMTUNE_COMPILE=0``) and snella on the compiled path (``TRIMTUNE_COMPILE=auto``),
   ``--reps`` interleaved rounds after a warm-up step (which compiles); ratios to lora;
4. ``profile``: torch.profiler's top ops of one step of the default snella path on the first
   model at the first batch;
5. ``rss`` (run alone in a fresh process, ``--sections rss``): the resident memory the
   compiler runtime adds.

Run (the issue 17 table, ~40 min on a shared 2-core CPU):
    .venv/bin/python benchmarks/bench_snell_ops.py --tag cpu
Quick:  ... --models vit_base_patch16_224 --batches 8 --reps 2 --sections steps
Writes benchmarks/results/snell_ops_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, machine_info, machine_markdown, md_table, write_results  # noqa: E402

from trimtune.train_step import build_train_step  # noqa: E402
from trimtune.tuners.snell import autograd, delta, sparsifier  # noqa: E402
from trimtune.tuners.snell.layer import SnellLinear  # noqa: E402
from trimtune.tuners.snell.kernels import create_kernel  # noqa: E402


def timed(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable over ``reps`` interleaved rounds (after one warm-up)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def mixture_update(device: torch.device) -> torch.Tensor:
    """|dW| of a freshly initialised 768 x 3072 mixture unit (the real value distribution)."""
    torch.manual_seed(0)
    u = delta.SparseDelta(768, 3072, 8, create_kernel("mixture", 2), sparsity=0.7).to(device)
    with torch.no_grad():
        return u.dense_delta().abs().flatten()


def threshold_ops(device: torch.device, reps: int) -> dict[str, float]:
    v = mixture_update(device)
    k = sparsifier.num_zeroed(0.7, v.numel())
    return timed({"kthvalue": lambda: sparsifier.kth_smallest(v, k, "kthvalue"),
                  "sample + exact refine": lambda: sparsifier.kth_smallest(v, k, "sample"),
                  "sort": lambda: v.sort().values[k - 1],
                  "topk (smaller side)": lambda: sparsifier.kth_smallest(v, k, "topk")},
                 reps, device)


def with_compile(setting: str, f):
    """``f`` run with ``TRIMTUNE_COMPILE=setting`` (restored afterwards)."""
    def g() -> None:
        old = os.environ.get("TRIMTUNE_COMPILE")
        os.environ["TRIMTUNE_COMPILE"] = setting
        try:
            f()
        finally:
            if old is None:
                os.environ.pop("TRIMTUNE_COMPILE")
            else:
                os.environ["TRIMTUNE_COMPILE"] = old
    return g


def layer_backward(device: torch.device, reps: int, tokens: int) -> dict[str, float]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        u = delta.SparseDelta(768, 3072, 8, create_kernel("mixture", 2), sparsity=0.7)
        return SnellLinear.from_units(nn.Linear(768, 3072), [u]).to(device)

    layers = {"compiled": make(), "closed form": make(), "autograd": make()}
    x = torch.randn(tokens, 768, device=device)
    real = autograd.closed_form_supported

    def run(name: str):
        def f() -> None:
            autograd.closed_form_supported = real if name != "autograd" else (lambda k: False)
            try:
                layers[name](x.clone().requires_grad_(True)).square().mean().backward()
            finally:
                autograd.closed_form_supported = real
        return with_compile("1" if name == "compiled" else "0", f)

    return timed({n: run(n) for n in layers}, reps, device)


def compile_rss() -> dict[str, float]:
    """Resident memory (MB) the compiled path adds to a process: one fused DINOv2-S-sized
    MLP unit (384 -> 1536) trained one step eagerly, then one step compiled (the compiler
    runtime, its graphs and kernels), then three more. Meaningful only as the first section of
    a fresh process (``--sections rss``)."""
    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS"))

    torch.manual_seed(0)
    u = delta.SparseDelta(384, 1536, 8, create_kernel("mixture", 2), sparsity=0.7)
    layer = SnellLinear.from_units(nn.Linear(384, 1536), [u])
    x = torch.randn(64, 384, requires_grad=True)
    with_compile("0", lambda: layer(x).sum().backward())()
    eager = rss()
    with_compile("1", lambda: layer(x).sum().backward())()
    first = rss()
    for _ in range(3):
        with_compile("1", lambda: layer(x).sum().backward())()
    return {"eager_mb": eager, "compiled_first_mb": first, "compiled_later_mb": rss()}


STEP_VARIANTS = {"lora": ("lora", "0"), "snella eager": ("snella", "0"),
                 "snella": ("snella", "auto")}


def train_steps(model: str, batch: int, device: torch.device, reps: int) -> dict[str, float]:
    """Step seconds of :data:`STEP_VARIANTS` (the snella variants share nothing: two models)."""
    steps = {}
    for name, (method, setting) in STEP_VARIANTS.items():
        _, step = build_train_step(model, method=method, batch_size=batch,
                                   pretrained=False, device=str(device))
        steps[name] = with_compile(setting, step)
    return timed(steps, reps, device)


def profile_step(model: str, batch: int, device: torch.device, rows: int = 12) -> list:
    """Top ops (self time) of one default-path snella step after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    _, step = build_train_step(model, method="snella", batch_size=batch, pretrained=False,
                               device=str(device))
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:rows]
    return [(e.key[:60], e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count)
            for e in top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["vit_base_patch16_224", "dinov2_small.imgfocus"],
                    help="timm or zoo names, random init (speed does not depend on the weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", nargs="+", default=["threshold", "layer", "steps", "profile"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default=None, help="results file snell_ops_<tag> (default: device)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    res: dict = {"steps": {}}
    md = [f"# SNELL / SNELLA op costs ({a.device})", "",
          f"Medians of {a.reps} interleaved repetitions after one warm-up (which compiles). "
          "The machine is shared with other engineers' jobs: absolute times carry their load, "
          "ratios measured interleaved in one process are the figures to read.", ""]

    def table(d: dict[str, float], ref: str) -> str:
        return md_table(["variant", "median ms", f"x {ref}"],
                        [[k, f"{1e3 * v:.2f}", f"{v / d[ref]:.2f}"] for k, v in d.items()])

    if "rss" in a.sections:
        log("resident memory of the compiled path (fresh process)")
        r = res["rss"] = compile_rss()
        md += ["## Resident memory the compiled path adds (first section of a fresh process)", "",
               f"RSS after an eager step of a 384 -> 1536 unit {r['eager_mb']:.0f} MB; after "
               f"the first compiled step {r['compiled_first_mb']:.0f} MB "
               f"(+{r['compiled_first_mb'] - r['eager_mb']:.0f} MB: compiler runtime, graphs, "
               f"kernels; a warm on-disk Inductor cache makes this a load, not a build); after "
               f"three more {r['compiled_later_mb']:.0f} MB.", ""]
    if "threshold" in a.sections:
        log("threshold of a 768 x 3072 update")
        res["threshold_s"] = threshold_ops(dev, a.reps)
        md += ["## Exact k-th value of |dW| (768 x 3072 mixture update, sparsity 0.7)", "",
               table(res["threshold_s"], "kthvalue"), ""]
        write_results(f"snell_ops_{a.tag or a.device}", "\n".join(md), res)
    if "layer" in a.sections:
        log("one 768 -> 3072 SNELLA layer, forward + backward")
        res["layer_s"] = layer_backward(dev, a.reps, tokens=8 * 197)
        md += ["## One fused SNELLA layer 768 -> 3072, r = 8, 1576 tokens (ViT-B batch 8), "
               "forward + backward", "", table(res["layer_s"], "autograd"), ""]
        write_results(f"snell_ops_{a.tag or a.device}", "\n".join(md), res)
    if "steps" in a.sections:
        rows = []
        for model in a.models:
            for batch in a.batches:
                log(f"training steps of {model} at batch {batch}")
                r = train_steps(model, batch, dev, a.reps)
                res["steps"][f"{model}|{batch}"] = r
                rows.append([model, batch, *(f"{1e3 * r[v]:.0f}" for v in STEP_VARIANTS),
                             f"{r['snella eager'] / r['lora']:.2f}",
                             f"{r['snella'] / r['lora']:.2f}"])
                write_results(f"snell_ops_{a.tag or a.device}", "\n".join(md), res)
        md += ["## One AdamW training step, rank 8, sparsity 0.7 (random init, 224 px)", "",
               "`snella eager`: `TRIMTUNE_COMPILE=0` (the code before issue 17's compiled "
               "path, with the sampled threshold); `snella`: the default path.", "",
               md_table(["model", "batch", *(f"{v} ms" for v in STEP_VARIANTS),
                         "eager / lora", "snella / lora"], rows), ""]
    if "profile" in a.sections:
        log(f"profile of a snella step, {a.models[0]} batch {a.batches[0]}")
        res["profile"] = profile_step(a.models[0], a.batches[0], dev)
        md += [f"## Where a snella step goes: {a.models[0]}, batch {a.batches[0]} "
               "(torch.profiler, self time, one step after a warm-up)", "",
               md_table(["op", "self ms", "share", "calls"],
                        [[f"`{k}`", f"{ms:.0f}", f"{sh * 100:.0f}%", c]
                         for k, ms, sh, c in res["profile"]]), ""]
    info = machine_info()
    md += ["## Machine", "", machine_markdown(info), ""]
    write_results(f"snell_ops_{a.tag or a.device}", "\n".join(md),
                  {"args": vars(a), "machine": info, "results": res})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
