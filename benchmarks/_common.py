"""Helpers shared by the benchmark scripts: machine / version info and the results writer.

    from _common import machine_info, write_results, Timer
    info = machine_info()
    write_results("quality_cpu", markdown, {"machine": info, "rows": rows},
                  figure=lambda p: plot_bars(groups, p, ylabel="accuracy"))

Every file goes through ``trimtune.checkpoint`` (temp file + rename), so a benchmark killed
half-way leaves the previous complete result (or the last partial one) intact, never a
half-written file.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trimtune.checkpoint import atomic_path, write_json

#: where results go; TRIMTUNE_RESULTS redirects them (benchmarks/quality_pool.py's single runs)
RESULTS = Path(os.environ.get("TRIMTUNE_RESULTS") or Path(__file__).resolve().parent / "results")


def cpu_name() -> str:
    """CPU model string from /proc/cpuinfo (Linux) or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed or broken: report it as missing, never fail
        return None
    return getattr(mod, "__version__", "unknown")


def gpu_info() -> list[dict[str, Any]]:
    """One dict per visible CUDA device (name, memory in GiB); empty on a CPU-only machine."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name,
                        "memory_gib": round(p.total_memory / 2**30, 1)})
        return out
    except Exception:
        return []


def machine_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: CPU, cores, torch threads, GPUs, versions, date, command.

    Args:
        argv: the command line to record (default ``sys.argv``).
    """
    import torch

    argv = list(sys.argv if argv is None else argv)
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        # the vector ISA torch's CPU kernels use (AVX2 / AVX512): element-wise-heavy updates
        # (SNELL / SNELLA) slow down more than matmuls without AVX-512
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in
                     ("torch", "timm", "accelerate", "peft", "trimtune", "numpy", "sklearn")},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in
                            [Path(sys.executable).name, *argv]),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    """A short markdown block describing ``machine_info()``."""
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in info.get("gpu") or [])
    vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
    return "\n".join([
        f"- machine: {info.get('cpu')}"
        + (f" ({info['cpu_capability']})" if info.get("cpu_capability") else "")
        + f", {info.get('cores')} cores, torch threads {info.get('torch_threads')}; "
        f"GPU: {gpus or 'none'}",
        f"- python {info.get('python')}; {vers}",
        f"- date: {info.get('date')}",
        f"- command: `{info.get('command')}`",
    ])


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant decimals."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(stem: str, markdown: str, data: dict[str, Any],
                  figure: Any | Callable[[Path], Any] | None = None,
                  out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``.json`` (and ``.png``) atomically.

    Args:
        stem: file name without suffix, e.g. ``"quality_cpu"``.
        markdown: the report text.
        data: JSON-serialisable results (non-JSON values are written with ``str``).
        figure: a matplotlib ``Figure``, or a callable ``f(path)`` that writes the PNG itself
            (e.g. ``lambda p: plot_bars(groups, p, ylabel="acc")``), or None.
        out_dir: default ``benchmarks/results``.

    Returns:
        ``{"md": path, "json": path[, "png": path]}``.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    write_json(paths["json"], data)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown.rstrip() + "\n")
    if figure is not None:
        paths["png"] = out / f"{stem}.png"
        if callable(figure) and not hasattr(figure, "savefig"):
            figure(paths["png"])
        else:
            import matplotlib.pyplot as plt

            with atomic_path(paths["png"]) as tmp:
                figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            plt.close(figure)
    return paths


class Timer:
    """Wall-clock timer: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def params_m(model: Any) -> float:
    """Parameters of ``model`` in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def load_eval_sets(model: Any, specs: dict[str, tuple[str, str, str, str]],
                   test_images: int = 0, seed: int = 0) -> dict[str, tuple[Any, Any]]:
    """``{name: (train set, test set)}`` read with ``model``'s evaluation transform.

    Args:
        specs: ``{name: (train spec, train split, test spec, test split)}``.
        test_images: cap each test set (stratified, seeded); 0 = the whole test set.
    """
    import trimtune as tt
    from trimtune.data import stratified_choice

    tf = tt.build_transform(model, train=False)
    sets = {}
    for name, (trs, trsplit, tes, tesplit) in specs.items():
        te = tt.load_dataset(tes, tesplit, transform=tf, seed=seed)
        if test_images and test_images < len(te):
            te = te.subset(stratified_choice(te.targets, test_images, seed))
        sets[name] = (tt.load_dataset(trs, trsplit, transform=tf, seed=seed), te)
    return sets


def finish(stem: str, lines: Sequence[str], info: dict[str, Any], data: dict[str, Any]) -> int:
    """End a benchmark: its report ``lines`` + a Machine section written to ``stem``.md and
    ``{"machine": info, **data}`` to ``stem``.json (results folder), the report printed; 0."""
    md = "\n".join([*lines, "", "## Machine", "", machine_markdown(info), ""])
    write_results(stem, md, {"machine": info, **data})
    print(md)
    return 0


def log(msg: str) -> None:
    """Timestamped progress line on stdout, flushed (benchmarks run under nohup)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
