"""The training-memory probe: the peak is that of the measured steps, not of the warm-up."""

from pathlib import Path

import pytest
import torch
from torch import nn

from trimtune.measure.memory import measure_subprocess

MB = 2**20


def warm_transient(transient_mb: int, persist_mb: int, steady_mb: int):
    """A builder whose first step allocates a large temporary (as a first-call compile does)
    and keeps ``persist_mb`` (as optimizer state is kept); later steps use ``steady_mb``."""
    state = {"i": 0, "keep": None}

    def step() -> None:
        if state["i"] == 0:
            tmp = torch.ones(transient_mb * MB // 4)
            state["keep"] = torch.ones(persist_mb * MB // 4)
            del tmp
        else:
            tmp = torch.ones(steady_mb * MB // 4)
            del tmp
        state["i"] += 1

    return nn.Linear(1, 1), step


@pytest.mark.slow
def test_peak_counts_steady_steps_and_what_warmup_keeps(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the child imports tests.measure
    kw = dict(transient_mb=400, persist_mb=60, steady_mb=100)
    r = measure_subprocess("tests.measure.test_measure_memory:warm_transient", kw, steps=2,
                           warmup=1)
    rise = r["peak_bytes"] / MB
    assert 150 <= rise <= 200, rise  # persist + steady (+ a little), not the 400 MB warm-up
    r0 = measure_subprocess("tests.measure.test_measure_memory:warm_transient", kw, steps=2,
                            warmup=0)
    assert r0["peak_bytes"] / MB >= 400  # no warm-up: the first step is measured
