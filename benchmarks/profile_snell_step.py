"""Training-step time of LoRA vs SNELL vs SNELLA on CPU (one AdamW step, random batch).

Run:  .venv/bin/python benchmarks/profile_snell_step.py [--reps 5] [--threads 2]
          [--model dinov2_small.imgfocus] [--img-size 112] [--batch 32] [--profile snella]

Every method's model is built once; each repetition times one step of every method in turn
(interleaved, so load from other processes hits all methods alike); medians after one warm-up
step, and ratios to LoRA. Variants:

- ``lora``: PEFT LoRA r = 8 (trimtune.pipeline baseline);
- ``snell`` / ``snella``: r = 8, sparsity 0.7 target, default config (fused path, no branch
  dropout / drop-path);
- ``snella-paper``: the authors' branch dropout 0.1 / drop-path 0.1 (unfused path).

``--profile NAME`` prints the torch.profiler table of one step of that variant. Prints a
markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from trimtune.models import create_backbone
from trimtune.pipeline import FinetuneConfig, prepare

VARIANTS = {
    "lora": ("lora", {}),
    "snell": ("snell", {}),
    "snella": ("snella", {}),
    "snella-paper": ("snella", {"dropout": 0.1, "drop_path": 0.1}),
}


def build(name: str, args) -> callable:
    method, kw = VARIANTS[name]
    torch.manual_seed(0)
    m = create_backbone(args.model, num_classes=10, img_size=args.img_size)
    m, _ = prepare(m, FinetuneConfig(method=method, rank=args.rank, sparsity=0.7,
                                     init_sparsity=0.5 if method == "snella" else 0.0,
                                     method_kwargs=kw), total_steps=100)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(m(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="lora,snell,snella,snella-paper")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    steps = {n: build(n, args) for n in names}
    for s in steps.values():
        s()  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, r={args.rank}, "
          f"{args.threads} threads, {args.reps} interleaved reps (median)")
    print("| variant | step s (median) | min | max | x lora |")
    print("|---|---|---|---|---|")
    for n in names:
        ratio = med[n] / med["lora"] if "lora" in med else float("nan")
        print(f"| {n} | {med[n]:.3f} | {min(times[n]):.3f} | {max(times[n]):.3f} | "
              f"{ratio:.2f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps[args.profile]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
