"""Run folders of the training loop: never overwritten by accident, an overwriting run swapped in
only once it finished, resume refuses changed settings, SIGTERM / SIGINT leave a checkpoint
that resumes bit-identically, stale temporary files are removed on the next start."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ce_objective, tiny_data, tiny_mlp  # noqa: E402

from trimtune.checkpoint import (atomic_path, clean_stale, replaced_path,  # noqa: E402
                                 staging_path)
from trimtune.errors import RunInterrupted, TrimtuneError  # noqa: E402
from trimtune.train import TrainConfig, fit, load_checkpoint  # noqa: E402


def cfg(out, **kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.01,
                out_dir=out, progress=False, log_every=4, seed=1)
    return TrainConfig(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_is_off_by_default_and_a_finished_run_is_refused(tmp_path):
    assert TrainConfig().resume is False and TrainConfig().overwrite is False
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out))
    before = snapshot(out)
    with pytest.raises(TrimtuneError, match=r"already holds a run: pass --overwrite"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, lr=5e-3))
    assert snapshot(out) == before  # refused before touching anything


def test_no_out_dir_gives_a_new_numbered_folder_each_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = fit(tiny_mlp(), tiny_data(), ce_objective, cfg(None))
    b = fit(tiny_mlp(), tiny_data(), ce_objective, cfg(None))
    assert a.out_dir == Path("runs/train-001") and b.out_dir == Path("runs/train-002")
    assert a.checkpoint.is_file() and b.checkpoint.is_file()


def test_overwrite_replaces_only_when_the_new_run_finished(tmp_path):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out))
    before = snapshot(out)

    class Boom:
        def after_optimizer_step(self, state):
            if state.step == 5:
                raise RuntimeError("disk died")

    with pytest.raises(RuntimeError, match="disk died"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True, lr=5e-3),
            callbacks=[Boom()])
    assert snapshot(out) == before  # the old run is exactly as it was
    assert not staging_path(out).exists() and not replaced_path(out).exists()

    res = fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True, lr=5e-3))
    assert res.out_dir == out and res.checkpoint == out / "checkpoint" / "state.pt"
    assert load_checkpoint(out)["settings"]["lr"] == 5e-3
    assert not staging_path(out).exists() and not replaced_path(out).exists()


@pytest.mark.parametrize("change", [dict(lr=2e-2), dict(batch_size=4), dict(seed=2),
                                    dict(epochs=3), dict(clip_grad=1.0)])
def test_resume_refuses_a_changed_setting(tmp_path, change):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, max_steps=3))
    (key,) = change
    with pytest.raises(TrimtuneError, match=rf"cannot resume .*: {key}=.* differs from the "
                                            rf"checkpoint's {key}="):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, resume=True, **change))
    # where / how often / how long to run now are not result settings: accepted
    fit(tiny_mlp(), tiny_data(), ce_objective,
        cfg(out, resume=True, log_every=1, ckpt_every=2, max_steps=5))
    assert load_checkpoint(out)["step"] == 5


def test_resume_refuses_a_changed_caller_setting(tmp_path):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, max_steps=3), settings={"rank": 4})
    with pytest.raises(TrimtuneError, match=r"rank=8 differs from the checkpoint's rank=4"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, resume=True), settings={"rank": 8})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_that_resumes_bit_identically(tmp_path, signum):
    ref = tiny_mlp()
    fit(ref, tiny_data(), ce_objective, cfg(tmp_path / "ref"))

    class Kill:
        def after_optimizer_step(self, state):
            if state.step == 5:
                os.kill(os.getpid(), signum)

    handler = signal.getsignal(signum)
    with pytest.raises(RunInterrupted, match=r"at optimizer step 5 of 16; checkpoint written "
                                             r"to .*--resume") as e:
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(tmp_path / "run"), callbacks=[Kill()])
    assert e.value.signum == signum and signal.getsignal(signum) == handler  # restored
    assert load_checkpoint(tmp_path / "run")["step"] == 5
    torch.manual_seed(99)
    resumed = tiny_mlp(seed=3)
    fit(resumed, tiny_data(), ce_objective, cfg(tmp_path / "run", resume=True))
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_signal_during_an_overwrite_keeps_the_previous_run_and_the_new_one_resumable(tmp_path):
    """Issue 23: an interrupted --overwrite run leaves the old run intact AND the new one
    resumable: --overwrite --resume continues it beside the old one and swaps it in when it
    finishes, bit-identical to an uninterrupted run."""
    ref = tiny_mlp()
    fit(ref, tiny_data(), ce_objective, cfg(tmp_path / "ref", lr=5e-3))
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out))
    before = snapshot(out)

    class Kill:
        def after_optimizer_step(self, state):
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted, match=r"at optimizer step 3 of 16; the previous run in "
                                             r".* is untouched and the new one is kept in "
                                             r".*\.run\.staging: .*--overwrite --resume"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True, lr=5e-3),
            callbacks=[Kill()])
    assert snapshot(out) == before
    assert load_checkpoint(staging_path(out))["step"] == 3
    # the next start in that folder (clean_stale) keeps it: it holds a checkpoint
    assert staging_path(out) not in clean_stale(out) and staging_path(out).is_dir()
    with pytest.raises(TrimtuneError, match="already holds a run"):  # the old rule still holds
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, lr=5e-3))

    torch.manual_seed(99)
    resumed = tiny_mlp(seed=3)
    res = fit(resumed, tiny_data(), ce_objective, cfg(out, overwrite=True, resume=True, lr=5e-3))
    assert res.out_dir == out and res.checkpoint == out / "checkpoint" / "state.pt"
    assert not staging_path(out).exists() and not replaced_path(out).exists()
    assert load_checkpoint(out)["settings"]["lr"] == 5e-3 and load_checkpoint(out)["step"] == 16
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TrimtuneError, match="there is none"):  # nothing staged any more
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True, resume=True))


def test_overwrite_alone_starts_an_interrupted_overwrite_again(tmp_path):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out))

    class Kill:
        def after_optimizer_step(self, state):
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True), callbacks=[Kill()])
    assert staging_path(out).is_dir()
    with pytest.warns(UserWarning, match="starts again: the interrupted --overwrite run kept"):
        fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, overwrite=True, max_steps=4))
    assert load_checkpoint(out)["step"] == 4 and not staging_path(out).exists()


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, max_steps=3))
    # what `kill -9` during a checkpoint write and during an overwrite swap leave behind
    stale = out / "checkpoint" / ".state.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    staging_path(out).mkdir()
    (staging_path(out) / "metrics.jsonl").write_text("{}\n")
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out, resume=True))
    assert not stale.exists() and not staging_path(out).exists()
    assert not list(out.rglob(".*.tmp"))


def test_killed_between_the_swap_renames_restores_the_previous_run(tmp_path):
    out = tmp_path / "run"
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(out))
    before = snapshot(out)
    os.replace(out, replaced_path(out))  # the first rename of a swap happened, then kill -9
    removed = clean_stale(out)
    assert replaced_path(out) in removed and snapshot(out) == before


def test_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(TrimtuneError, match="no space left on the device writing .*x.json"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_nan_advice_is_a_fresh_run_not_a_resume(tmp_path):
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        loss, logs = ce_objective(model, batch)
        return (loss * float("nan"), logs) if calls["n"] == 4 else (loss, logs)

    with pytest.raises(TrimtuneError) as e:
        fit(tiny_mlp(), tiny_data(), objective, cfg(tmp_path / "run", ckpt_every=2))
    msg = str(e.value)
    assert "--overwrite" in msg and "lower lr" in msg and "then resume" not in msg
    # the advice works: a fresh run with a lower lr over the failed one is accepted
    fit(tiny_mlp(), tiny_data(), ce_objective, cfg(tmp_path / "run", overwrite=True, lr=1e-3))
