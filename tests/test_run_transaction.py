"""A fine-tuning run is one run_folder transaction: finetune opens it, the loop writes into it
(``trimtune.train.loop.fit_in``) without opening a second one; ``fit`` alone opens its own."""

from __future__ import annotations

import contextlib

import pytest

import trimtune as tt
import trimtune.checkpoint as ckpt
import trimtune.tasks as tasks
import trimtune.train.loop as loop

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def opened(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def counted(out, **kw):
        calls.append(out)
        with ckpt.run_folder(out, **kw) as work:
            yield work

    monkeypatch.setattr(tasks, "run_folder", counted)
    monkeypatch.setattr(loop, "run_folder", counted)
    return calls


def test_finetune_opens_one_run_folder(tmp_path, vit, opened):
    cfg = tt.FinetuneConfig(method="lora", r=2, train=tt.TrainConfig(
        epochs=1, max_steps=2, batch_size=8, out_dir=str(tmp_path / "run"), progress=False))
    r = tt.finetune(vit, "synthetic:classes=5,n=16,size=32", cfg)
    assert opened == [tmp_path / "run"]
    assert {"run.json", "metrics.jsonl", "checkpoint", "adapter"} <= {
        p.name for p in r.out_dir.iterdir()}
