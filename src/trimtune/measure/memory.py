"""Peak training memory of one configuration.

CUDA: ``torch.cuda.max_memory_allocated`` around training steps, in process.
CPU: each configuration runs in a fresh subprocess (so allocator caches and earlier runs do
not leak into the figure); the figure is the process's peak resident memory (``ru_maxrss``)
minus its resident memory right after the model was built, the peak taken over the measured
steps (the peak counter, VmHWM, is reset through /proc/self/clear_refs after the build and
again after the warm-up steps, so neither building the model nor one-time warm-up work such
as a first-call ``torch.compile`` counts; what the warm-up leaves allocated does). It
therefore counts activations kept for backward, gradients, optimizer state and temporaries,
not the weights themselves. CUDA likewise: the peak statistics are reset after the warm-up.
Allocator slack: glibc keeps freed heap resident and reuses it, which would hide later
allocations (the model build frees hundreds of MB). The child therefore runs with
``MALLOC_MMAP_THRESHOLD_=65536`` (every large tensor is its own mmap, returned to the system
when freed) and calls ``malloc_trim(0)`` before the baseline, so the RSS rise follows live
tensor bytes. Repeats differ by a few MB; report medians when comparing close figures.

The configuration is built by a user function named ``"module:function"`` that returns
``(model, step_fn)``; ``step_fn()`` runs one training step. Keeping the builder a name lets
the child import it without this module importing the methods.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_process(builder: str, kwargs: dict, steps: int = 3, warmup: int = 1) -> dict:
    import torch
    mod, fn = builder.split(":")
    model, step_fn = getattr(importlib.import_module(mod), fn)(**kwargs)
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import gc
        gc.collect()
        _malloc_trim()
        base = _rss_bytes()
        _reset_peak_rss()
    times = []
    for i in range(warmup + steps):
        if i == warmup and warmup:
            # the peak of the measured (steady) steps: one-time work of the warm-up steps (a
            # torch.compile of the SNELL kernels on its first call) does not count; what it
            # leaves allocated (optimizer state, compiled code) still does, as a rise over base
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
        t0 = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        total = torch.cuda.max_memory_allocated()
    else:
        peak_rss = _peak_rss_bytes()
        peak, total = peak_rss - base, peak_rss
    times.sort()
    return {"peak_bytes": int(peak), "total_peak_bytes": int(total), "base_bytes": int(base),
            "step_s": times[len(times) // 2], "device": "cuda" if cuda else "cpu"}


def measure_subprocess(builder: str, kwargs: dict, steps: int = 3, warmup: int = 1,
                       timeout: float = 900) -> dict:
    """Run :func:`measure_in_process` in a fresh Python process and return its result."""
    code = ("import json,sys; from trimtune.measure.memory import measure_in_process as m; "
            "a=json.loads(sys.argv[1]); print('@@'+json.dumps(m(**a)))")
    arg = json.dumps({"builder": builder, "kwargs": kwargs, "steps": steps, "warmup": warmup})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                       timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"memory probe failed ({builder} {kwargs}):\n{p.stderr[-2000:]}")
