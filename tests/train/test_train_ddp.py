"""Two CPU processes (gloo, torchrun) train to the same weights as one, same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from train_helpers import ce_objective, run_config, tiny_data, tiny_mlp  # noqa: E402

from trimtune.train import fit  # noqa: E402


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    path = [p for p in (os.environ.get("PYTHONPATH"), str(HERE.parents[1] / "src")) if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK"))}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                           str(HERE / "train_ddp_worker.py"), str(tmp_path / "ddp"), "4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "final.pt")
    assert ddp["world"] == 2

    model = tiny_mlp()
    fit(model, tiny_data(), ce_objective, run_config(tmp_path / "one", 8))
    start = tiny_mlp().state_dict()
    for k, v in model.state_dict().items():
        assert not torch.equal(v, start[k])  # it trained
        torch.testing.assert_close(ddp["state"][k], v, atol=1e-5, rtol=1e-5)
