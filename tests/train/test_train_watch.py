"""A run that diverges or falls to chance says so (one line, with the fix); the thread count a
run computed with is recorded, set by ``TrainConfig.threads``, and a resume under another warns."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ce_objective, tiny_data, tiny_mlp  # noqa: E402

from trimtune.errors import TrainingCollapseWarning, TrimtuneError  # noqa: E402
from trimtune.train import CollapseWatch, LossWatch, TrainConfig, fit, load_checkpoint  # noqa: E402


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=1e-2, min_lr=1e-4, weight_decay=0.01,
                out_dir=tmp_path, progress=False, log_every=2, seed=1)
    return TrainConfig(**{**base, **kw})


def _state(**kw):
    base = dict(warnings=[], accelerator=None, config=SimpleNamespace(lr=0.01), step=5,
                total_steps=10, epoch=1, logs={})
    return SimpleNamespace(**{**base, **kw})


def test_diverging_loss_warns_once_with_the_fix(tmp_path):
    calls = {"n": 0}

    def objective(model, batch):  # a run whose loss explodes after 6 steps
        calls["n"] += 1
        loss, logs = ce_objective(model, batch)
        return (loss * 20 if calls["n"] > 6 else loss), logs

    with pytest.warns(TrainingCollapseWarning, match=r"rose from .* lower lr \(now 0.01"):
        res = fit(tiny_mlp(), tiny_data(), objective, cfg(tmp_path))
    assert len(res.warnings) == 1 and "diverging" in res.warnings[0]


def test_healthy_run_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingCollapseWarning)
        res = fit(tiny_mlp(), tiny_data(), ce_objective, cfg(tmp_path))
    assert res.warnings == []


def test_collapse_watch_names_best_epoch_and_the_fix():
    w = CollapseWatch("val_acc", chance=0.1)
    s = _state(logs={"val_acc": 0.72}, epoch=0)
    w.on_evaluate(s)
    assert s.warnings == []
    s.logs, s.epoch = {"val_acc": 0.19}, 3
    with pytest.warns(TrainingCollapseWarning, match=r"collapsed.*0\.190 at epoch 3.*0\.720 at "
                                                     r"epoch 0.*lower lr"):
        w.on_evaluate(s)
    s.logs, s.epoch = {"val_acc": 0.11}, 4
    w.on_evaluate(s)  # said once
    assert len(s.warnings) == 1
    # a run that never left chance is said at its last evaluation only
    w2, s2 = CollapseWatch("val_acc", chance=0.5), _state(logs={"val_acc": 0.52})
    w2.on_evaluate(s2)
    assert s2.warnings == []
    s2.step = s2.total_steps
    with pytest.warns(TrainingCollapseWarning, match="never left chance"):
        w2.on_evaluate(s2)
    # resumable: its state is part of the checkpoint
    w3 = CollapseWatch()
    w3.load_state_dict(w.state_dict())
    assert w3.best == (0.72, 0) and w3.warned


def test_loss_watch_tolerates_noise():
    w, s = LossWatch(), _state()
    for v in (2.3, 2.0, 2.6, 1.0, 3.0):  # noisy, never 2x the start and 0.5 above it
        s.logs = {"loss": v}
        w.on_log(s)
    assert s.warnings == []


def test_threads_are_set_for_the_run_recorded_and_restored(tmp_path):
    seen = []

    def objective(model, batch):
        seen.append(torch.get_num_threads())
        return ce_objective(model, batch)

    before = torch.get_num_threads()
    fit(tiny_mlp(), tiny_data(), objective, cfg(tmp_path, threads=1, epochs=1))
    assert set(seen) == {1} and torch.get_num_threads() == before
    ck = load_checkpoint(tmp_path)
    assert ck["numerics"]["threads"] == 1 and ck["numerics"]["torch"] == torch.__version__
    with pytest.raises(TrimtuneError, match="threads=0"):
        TrainConfig(threads=0)


def test_resume_under_other_threads_warns_with_the_setting_to_replay(tmp_path):
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(tmp_path, threads=1, max_steps=3))
    if torch.get_num_threads() == 1:
        torch_threads = 2
    else:
        torch_threads = torch.get_num_threads()
    with pytest.warns(UserWarning, match=r"other numerics: threads .*--threads 1"):
        fit(tiny_mlp(), tiny_data(), ce_objective,
            cfg(tmp_path, threads=torch_threads, resume=True))
