"""Training step time and images/s per fine-tuning method, side by side.

Run:  .venv/bin/python benchmarks/bench_speed.py [--models ...] [--batches 8 32]
          [--methods full linear lora snell snella masked-sparse snella@c2] [--steps 2]
Writes benchmarks/results/speed_<cpu|cuda>.{md,json,png}: median step time of ``--steps``
steps after ``--warmup``, in a fresh process per configuration (the same measurement as
``bench_memory.py``; ``bench_train.py`` writes both reports from one run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(reports=("speed",), description=__doc__.splitlines()[0]))
