"""SNELLA fine-tuning through ``trimtune.finetune`` on 2 CPU processes (torchrun, gloo) ends
with the same weights and per-layer sparsities on both ranks, and matches one process with
the same global batch (2 x 4 = 8 images per step).

This file is also the worker: ``torchrun --nproc_per_node 2 test_tasks_ddp.py OUT_DIR``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trimtune as tt
from trimtune.checkpoint import torch_save_atomic
from trimtune.tasks import FinetuneConfig, finetune
from trimtune.tuners import iter_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_backbone  # noqa: E402

DATA = "synthetic:classes=4,n=32,size=32"
GLOBAL_BATCH = 8


def run_snella(out: Path, world: int) -> dict:
    """Fine-tune a seeded tiny ViT with SNELLA; no dropout / DropPath, so the two processes
    draw no random numbers that one process would draw differently."""
    model = tiny_backbone()
    train = tt.TrainConfig(epochs=2, batch_size=GLOBAL_BATCH // world, lr=3e-3, min_lr=1e-5,
                           weight_decay=0.0, out_dir=out, progress=False, resume=False)
    cfg = FinetuneConfig(method="snella", rank=4, sparsity=0.5, train=train,
                         branch_dropout=0.0, branch_drop_path=0.0)
    r = finetune(model, DATA, cfg)
    return {"state": {n: p.detach().clone() for n, p in r.model.named_parameters()
                      if p.requires_grad},
            "sparsity": {n: u.sparsity for n, u in iter_units(r.model)},
            "steps": r.history[-1]["step"]}


def worker(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    result = run_snella(out, world)
    torch_save_atomic({**result, "world": world}, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_snella_two_processes_match_one(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path, HF_HUB_OFFLINE="1")
    out = tmp_path / "ddp"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", __file__, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{i}.pt") for i in range(2))
    assert r0["world"] == r1["world"] == 2
    assert (out / "run.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_snella(tmp_path / "one", world=1)
    finally:
        torch.set_num_threads(n)
    assert r0["steps"] == r1["steps"] == one["steps"] == 2 * 32 // GLOBAL_BATCH
    assert r0["sparsity"] == r1["sparsity"]
    assert r0["sparsity"] == pytest.approx(one["sparsity"], abs=1e-6)
    start = run_start_state()
    diffs = []
    for k, v in one["state"].items():
        torch.testing.assert_close(r0["state"][k], r1["state"][k], atol=0, rtol=0, msg=k)
        # gradients are averaged in another order: float noise that Adam's normalised steps
        # can lift to a few % of one lr (3e-3) step on near-zero gradients, never more
        torch.testing.assert_close(r0["state"][k], v, atol=1e-4, rtol=0, msg=k)
        diffs.append((r0["state"][k] - v).abs().flatten())
        if k in start:
            assert not torch.equal(v, start[k]), f"{k} did not train"
    assert torch.cat(diffs).mean() < 1e-6


def run_start_state() -> dict[str, torch.Tensor]:
    """Head and cls token of the seeded model before training."""
    model = tiny_backbone()
    return {k: v for k, v in model.state_dict().items() if k.startswith(("head.", "cls_token"))}


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # clean teardown (gloo may abort at exit otherwise)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
