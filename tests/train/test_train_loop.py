"""The training loop: learns, resumes exactly, stops on NaN, calls callbacks in order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ce_objective, tiny_data, tiny_mlp  # noqa: E402

from trimtune.errors import TrimtuneError  # noqa: E402
from trimtune.train import EpochSampler, TrainConfig, fit, load_checkpoint  # noqa: E402


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.01,
                out_dir=tmp_path, progress=False, log_every=4, resume=False, seed=1)
    return TrainConfig(**{**base, **kw})


def mean_loss(model, data) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return ce_objective(model, (x, y))[0].item()


def test_fit_lowers_loss_and_logs(tmp_path):
    data, model = tiny_data(), tiny_mlp()
    before = mean_loss(model, data)
    res = fit(model, data, ce_objective, cfg(tmp_path, epochs=4),
              eval_fn=lambda m: {"val_loss": mean_loss(m, data)})
    assert mean_loss(model, data) < 0.7 * before
    assert res.step == 4 * (64 // 8) and not res.stopped_early
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("lr" in r and "img_per_s" in r for r in lines)
    assert sum("val_loss" in r for r in lines) == 4
    assert load_checkpoint(tmp_path)["step"] == res.step


def test_optimizer_groups_skip_frozen_and_decay_only_matrices(tmp_path):
    model = tiny_mlp()
    model[0].requires_grad_(False)
    seen = {}

    class Spy:
        def on_train_start(self, state):
            seen["groups"] = [(g["weight_decay"], [p.shape for p in g["params"]])
                              for g in state.optimizer.param_groups]

    fit(model, tiny_data(), ce_objective, cfg(tmp_path, epochs=1), callbacks=[Spy()])
    params = [p for _, shapes in seen["groups"] for p in shapes]
    assert torch.Size([16, 8]) not in params  # frozen layer not in the optimizer
    for wd, shapes in seen["groups"]:
        assert all(len(s) == 2 for s in shapes) if wd > 0 else all(len(s) == 1 for s in shapes)


def test_sampler_shards_union_equals_single_process_batches():
    one = list(EpochSampler(40, 8, seed=3))
    shards = [list(EpochSampler(40, 4, seed=3, rank=r, world=2)) for r in range(2)]
    for b in range(len(one) // 8):
        union = shards[0][b * 4:(b + 1) * 4] + shards[1][b * 4:(b + 1) * 4]
        assert sorted(union) == sorted(one[b * 8:(b + 1) * 8])
    s = EpochSampler(40, 8, seed=3)
    s.set_epoch(0, skip_batches=2)
    assert list(s) == one[16:]
    s.set_epoch(1)
    assert list(s) != one


class Recorder:
    """Counts steps, checks gradients exist at after_optimizer_step; its state is checkpointed."""

    def __init__(self):
        self.n, self.grads_seen = 0, 0

    def after_optimizer_step(self, state):
        self.n += 1
        self.grads_seen += all(p.grad is not None for p in state.model.parameters())

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, d):
        self.n = d["n"]


@pytest.mark.parametrize("stop_at", [5, 8])  # 5: mid-epoch (8 steps/epoch); 8: epoch boundary
def test_resume_is_bit_identical(tmp_path, stop_at):
    data = tiny_data()
    kw = dict(grad_accum=2, batch_size=4, ema=0.9, clip_grad=1.0)
    ref, rec_ref = tiny_mlp(), Recorder()
    fit(ref, data, ce_objective, cfg(tmp_path / "ref", **kw), callbacks=[rec_ref])

    part, rec = tiny_mlp(), Recorder()
    res = fit(part, data, ce_objective, cfg(tmp_path / "run", max_steps=stop_at, **kw),
              callbacks=[rec])
    assert res.stopped_early and res.step == stop_at
    torch.manual_seed(123)  # a different RNG state must not matter: the checkpoint restores it
    resumed, rec2 = tiny_mlp(seed=7), Recorder()
    res2 = fit(resumed, data, ce_objective, cfg(tmp_path / "run", resume=True, **kw),
               callbacks=[rec2])
    assert res2.step == 3 * 8 and rec2.n == rec_ref.n == 24
    assert rec_ref.grads_seen == 24
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    log = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "lr" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no duplicate lines after resume


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        loss, logs = ce_objective(model, batch)
        if calls["n"] == 7:  # the 7th optimizer step
            loss = loss * float("nan")
            logs["ce"] = loss.detach()
        return loss, logs

    model = tiny_mlp()
    with pytest.raises(TrimtuneError, match=r"step 7.*ce.*lower lr") as e:
        fit(model, tiny_data(), objective, cfg(tmp_path, ckpt_every=3))
    assert "step 6" in str(e.value)
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 6 < 7
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    fresh = tiny_mlp()
    fresh.load_state_dict(ck["model"])


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(TrimtuneError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(TrimtuneError, match="no full step"):
        fit(tiny_mlp(), tiny_data(n=4), ce_objective, cfg(tmp_path))
    with pytest.raises(TrimtuneError, match="no training checkpoint"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(tmp_path / "none", resume=True))


def test_best_weights_ema_stop_callback_and_cpu_fp16_note(tmp_path):
    data, model = tiny_data(), tiny_mlp()
    model[0].requires_grad_(False)
    scores = iter([0.5, 0.9, 0.7])

    class StopAfterEpoch2:
        def on_epoch_end(self, state):
            state.should_stop = state.epoch == 2

    with pytest.warns(UserWarning, match="needs a GPU"):
        res = fit(model, data, ce_objective, cfg(tmp_path, ema=0.5, mixed_precision="fp16",
                                                 select_metric="val_acc"),
                  callbacks=[StopAfterEpoch2()], eval_fn=lambda m: {"val_acc": next(scores)})
    assert res.stopped_early and res.step == 2 * 8
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["val_acc"] == 0.9 and res.best == tmp_path / "best"
    from trimtune.checkpoint import read_safetensors
    saved = read_safetensors(tmp_path / "best" / "model.safetensors")
    assert set(saved) == {"1.weight", "1.bias", "3.weight", "3.bias"}  # trainable only
    ema = res.ema.module.state_dict()
    live = load_checkpoint(tmp_path)["model"]  # the trained (not averaged) weights
    assert not torch.equal(ema["3.weight"], live["3.weight"])
    assert torch.equal(ema["3.weight"], model.state_dict()["3.weight"])  # the result: the EMA
    assert torch.equal(ema["0.weight"], model.state_dict()["0.weight"])  # frozen: unchanged
