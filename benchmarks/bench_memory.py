"""Peak training memory per fine-tuning method, side by side (CPU: fresh process per config).

Run:  .venv/bin/python benchmarks/bench_memory.py [--models ...] [--batches 8 32]
          [--methods full linear lora snell snella masked-sparse snella@c2] [--steps 2]
Writes benchmarks/results/memory_<cpu|cuda>.{md,json,png}. The same run also yields step
times; ``bench_train.py`` writes the memory and the speed report from one run. See
``bench_train.py`` for the method.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(reports=("memory",), description=__doc__.splitlines()[0]))
