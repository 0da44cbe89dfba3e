"""Bytes a training step keeps for backward, exactly (issue 15): original + LoRA vs compressed +
SNELLA with its updates on one or both factors.

For each configuration of ``bench_train.py`` (same names: ``lora``, ``snella``, ``snella@c2``,
``snella@c2:first``, ``snella@c2:both``) one training forward runs under
``torch.autograd.graph.saved_tensors_hooks``; the distinct storages it saves for backward are
summed (activations and the materialised updates). Added: the trainable state (parameters'
gradients + AdamW's two moments, 3 x 4 bytes per trainable parameter). Unlike a peak-RSS figure
this does not depend on the allocator or on other jobs sharing the machine, so it is exact on a
busy CPU; it leaves out temporaries freed during the step.

Run:  .venv/bin/python benchmarks/bench_saved.py
Writes benchmarks/results/saved_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, log, machine_info, md_table  # noqa: E402
from bench_train import MB, build_kwargs  # noqa: E402

from trimtune.train_step import build_train_step  # noqa: E402


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Distinct storage bytes saved for backward by one forward of ``model`` on ``x``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    del out
    return sum(v for k, v in seen.items() if k not in frozen)  # frozen weights are not extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_small.imgfocus")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--methods", nargs="+",
                    default=["lora", "snella", "snella@c2", "snella@c2:first", "snella@c2:both"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = machine_info()
    rows, data = [], {}
    for b in a.batches:
        for method in a.methods:
            kw = build_kwargs(a.model, method, b, rank=a.rank, img_size=a.img_size,
                              sparsity=a.sparsity, device="cpu")
            model, _ = build_train_step(**kw)
            model.train()
            size = model.patch_embed.img_size
            x = torch.randn(b, 3, *size)
            act = saved_bytes(model, x)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            units = sum(1 for n, _ in model.named_modules() if n.endswith(".snell_units"))
            state = 3 * 4 * trainable
            data[f"{method}|{b}"] = {"saved_bytes": act, "trainable": trainable,
                                     "state_bytes": state, "adapted_layers": units}
            log(f"{method} batch {b}: saved {act / MB:.1f} MB, trainable {trainable}")
            rows.append([method, b, units or "-", f"{trainable / 1e3:.1f}", f"{act / MB:.1f}",
                         f"{state / MB:.1f}", f"{(act + state) / MB:.1f}"])
            del model
    for b in a.batches:  # ratios to original + LoRA at the same batch
        ref = data.get(f"lora|{b}")
        if ref:
            for method in a.methods:
                d = data[f"{method}|{b}"]
                d["ratio_to_lora"] = ((d["saved_bytes"] + d["state_bytes"])
                                      / (ref["saved_bytes"] + ref["state_bytes"]))
    for r in rows:
        r.append(f"{data[f'{r[0]}|{r[1]}'].get('ratio_to_lora', float('nan')):.2f}x")
    md = [f"# Saved for backward: {a.model} at {a.img_size}px, rank {a.rank}", "",
          "One training forward per configuration; `saved` = distinct storages kept for "
          "backward (frozen weights excluded), `state` = gradients + AdamW moments of the "
          "trainable parameters (12 bytes each). Exact, independent of other jobs on the "
          "machine; temporaries freed within the step are not in it (see memory_*.md for peak "
          "RSS). `snella@c2`: SNELLA on the c = 2 model with the default targets (one update "
          "per factorised layer, on `.second`); `:first` / `:both`: on `.first` / on both.", "",
          md_table(["method", "batch", "adapted layers", "trainable (k)", "saved (MB)",
                    "state (MB)", "saved + state (MB)", "x lora"], rows)]
    return finish(f"saved_{a.tag}", md, info, {"args": vars(a), "rows": data})


if __name__ == "__main__":
    raise SystemExit(main())
