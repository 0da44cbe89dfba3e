"""Where a SNELL / SNELLA step spends its time, op by op (issue 7's speed analysis).

Three measurements on the current device (CUDA when available), each interleaved so that
background load hits every variant alike:

1. the exact k-th value of |dW| (a 768 x 3072 update, sparsity 0.7) by ``torch.kthvalue``,
   ``torch.sort`` and ``torch.topk`` of the smaller side (``snell.kth_smallest``);
2. forward + backward of one fused ``SnellLinear`` (768 -> 3072, mixture kernel, r = 8) with
   the hand-written kernel backward (``snell.delta_vjp``) against autograd through the
   recomputed update;
3. one AdamW training step (``pipeline.build_train_step``, SNELLA allocator included) of
   lora, snell and snella on ``--model`` at ``--batch``.

Run:  .venv/bin/python benchmarks/bench_snell_ops.py [--model vit_base_patch16_224]
          [--batch 8] [--reps 5] [--device cuda]
Writes benchmarks/results/snell_ops_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, machine_info, machine_markdown, md_table, write_results  # noqa: E402

from trimtune.pipeline import build_train_step  # noqa: E402
from trimtune.tuners import snell  # noqa: E402
from trimtune.tuners.kernels import create_kernel  # noqa: E402


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


def threshold_ops(device: torch.device, reps: int) -> dict[str, float]:
    v = torch.rand(768 * 3072, device=device)
    k = snell.num_zeroed(0.7, v.numel())
    return timed({"kthvalue": lambda: snell.kth_smallest(v, k, "kthvalue"),
                  "sort": lambda: v.sort().values[k - 1],
                  "topk (smaller side)": lambda: snell.kth_smallest(v, k, "topk")}, reps, device)


def layer_backward(device: torch.device, reps: int, tokens: int) -> dict[str, float]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        u = snell.SparseDelta(768, 3072, 8, create_kernel("mixture", 2), sparsity=0.7)
        return snell.SnellLinear(nn.Linear(768, 3072), [u]).to(device)

    layers = {"closed form": make(), "autograd": make()}
    x = torch.randn(tokens, 768, device=device)
    real = snell.closed_form_supported

    def run(name: str):
        def f() -> None:
            snell.closed_form_supported = real if name == "closed form" else (lambda k: False)
            try:
                layers[name](x.clone().requires_grad_(True)).square().mean().backward()
            finally:
                snell.closed_form_supported = real
        return f

    return timed({n: run(n) for n in layers}, reps, device)


def train_steps(model: str, batch: int, device: torch.device, reps: int) -> dict[str, float]:
    steps = {m: build_train_step(model, method=m, batch_size=batch, pretrained=False,
                                 device=str(device))[1] for m in ("lora", "snell", "snella")}
    return timed(steps, reps, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224",
                    help="timm name, random init (speed does not depend on the weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default=None, help="results file snell_ops_<tag> (default: device)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    res = {}
    log("threshold of a 768 x 3072 update")
    res["threshold_s"] = threshold_ops(dev, a.reps)
    log("one 768 -> 3072 SNELLA layer, forward + backward")
    res["layer_s"] = layer_backward(dev, a.reps, tokens=a.batch * 50)
    log(f"training steps of {a.model} at batch {a.batch}")
    res["step_s"] = train_steps(a.model, a.batch, dev, a.reps)

    def table(d: dict[str, float], ref: str) -> str:
        return md_table(["variant", "median ms", f"x {ref}"],
                        [[k, f"{1e3 * v:.2f}", f"{v / d[ref]:.2f}"] for k, v in d.items()])

    info = machine_info()
    md = [f"# SNELL / SNELLA op costs ({a.device})", "",
          f"Medians of {a.reps} interleaved repetitions after one warm-up.", "",
          "## Exact k-th value of |dW| (768 x 3072, sparsity 0.7)", "",
          table(res["threshold_s"], "kthvalue"), "",
          f"## One fused SNELLA layer 768 -> 3072, r = 8, {a.batch * 50} tokens, forward + "
          "backward", "", table(res["layer_s"], "autograd"), "",
          f"## One AdamW training step, {a.model} (random init), batch {a.batch}", "",
          table(res["step_s"], "lora"), "", "## Machine", "", machine_markdown(info), ""]
    write_results(f"snell_ops_{a.tag or a.device}", "\n".join(md),
                  {"args": vars(a), "machine": info, "results": res})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
