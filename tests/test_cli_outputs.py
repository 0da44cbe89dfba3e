"""Issue 23, "nothing lost, part 2", through the command line: every command that writes a model
or a run folder refuses a non-empty --out before loading anything and replaces it only with
--overwrite, swapped in when complete; the same inputs give byte-identical files; --no-progress /
progress=False silences every bar; an interrupted --overwrite run is kept for --overwrite --resume.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import trimtune as tt
from trimtune.checkpoint import read_json, staging_path
from trimtune.cli import main
from trimtune.runs import save_model
from trimtune.train import TrainConfig, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_backbone  # noqa: E402
DATA = "synthetic:classes=4,n=32,size=32"
FAST = ["--batch-size", "8", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_model(tiny_backbone(), tmp_path_factory.mktemp("models") / "tiny")


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def same_files(a: Path, b: Path, names: list[str]) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


# ----------------------------------------------------------------------------- 1. one rule


@pytest.mark.parametrize("command", ["compress", "merge", "export", "distill", "finetune"])
@pytest.mark.parametrize("held", ["model", "own files"])
def test_a_non_empty_out_is_refused_before_anything_loads(command, held, tiny_dir, tmp_path,
                                                         capsys):
    out = tmp_path / "out"
    if held == "model":
        save_model(tiny_backbone(), out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    missing = tmp_path / "no-such-source"  # loading it would fail with another message
    argv = {"compress": ["compress", "--model", missing],
            "merge": ["merge", missing],
            "export": ["export", missing],
            "distill": ["distill", "--student", missing, "--teacher", missing, "--data", DATA,
                        *FAST],
            "finetune": ["finetune", "--model", missing, "--data", DATA, *FAST]}[command]
    code, _, err = run([*argv, "--out", out], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"trimtune {command}: error: {out} ") and "--overwrite" in line
    assert ("already holds a" if held == "model" else "is not empty (it holds notes.txt)") in line
    assert snapshot(out) == before and not staging_path(out).exists()


def test_overwrite_replaces_a_model_folder_only_when_complete(tiny_dir, tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # a failing compress (ratio 1 is refused after loading) leaves the folder as it was
    code, _, err = run(["compress", "--model", tiny_dir, "--ratio", "1", "--no-plot",
                        "--overwrite", "--out", out], capsys)
    assert code == 2 and (out / "notes.txt").is_file() and not staging_path(out).exists()
    code, _, err = run(["compress", "--model", tiny_dir, "--no-plot", "--overwrite", "--out",
                        out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "trimtune.json"]
    assert not staging_path(out).exists()


# ----------------------------------------------------------------------------- 2. same bits


def test_same_inputs_give_byte_identical_model_adapter_and_record_files(tiny_dir, tmp_path,
                                                                        capsys):
    names = ["model.safetensors", "trimtune.json"]
    for d in ("c1", "c2"):
        code, _, err = run(["compress", "--model", tiny_dir, "--ratio", "2", "--no-plot",
                            "--out", tmp_path / d], capsys)
        assert code == 0, err
    same_files(tmp_path / "c1", tmp_path / "c2", names)
    for d in ("r1", "r2"):  # SNELLA's adapter header carries four metadata entries
        code, _, err = run(["finetune", "--model", tmp_path / "c1", "--data", DATA, "--r", "4",
                            "--epochs", "1", "--max-steps", "2", "--seed", "3", *FAST,
                            "--out", tmp_path / d], capsys)
        assert code == 0, err
    same_files(tmp_path / "r1", tmp_path / "r2", ["adapter/adapter_model.safetensors",
                                                  "adapter/adapter_config.json"])
    for r, m in (("r1", "m1"), ("r2", "m2")):
        assert run(["merge", tmp_path / r, "--out", tmp_path / m], capsys)[0] == 0
    same_files(tmp_path / "m1", tmp_path / "m2", names)
    # and a merge --overwrite onto an existing model gives the same bytes again
    assert run(["merge", tmp_path / "r1", "--overwrite", "--out", tmp_path / "c2"], capsys)[0] == 0
    same_files(tmp_path / "m1", tmp_path / "c2", names)


# ----------------------------------------------------------------------------- 3. no bars


def test_progress_false_draws_no_bar_at_all(tmp_path, capsys):
    tt.finetune(tiny_backbone(), DATA, TrainConfig(progress=False, epochs=1, batch_size=8,
                                               out_dir=tmp_path / "api"),
                test_data=DATA + "@test")
    err = capsys.readouterr().err
    assert "evaluate" not in err and "it/s" not in err and "%|" not in err, err


# ----------------------------------------------------------------------------- 4. interrupted


def test_an_interrupted_overwrite_keeps_both_runs_and_resumes_bit_identically(
        tiny_dir, tmp_path, capsys, monkeypatch):
    from trimtune.tuners import registry

    argv = ["finetune", "--model", tiny_dir, "--data", DATA, "--r", "4", "--epochs", "2",
            "--lr", "3e-3", *FAST]
    out = tmp_path / "run"
    assert run([*argv, "--seed", "5", "--out", out], capsys)[0] == 0  # the run to replace
    before = snapshot(out)

    kill_at = [3]

    class Kill:  # in the resumed run too (disarmed): checkpointed callbacks keep their places
        def after_optimizer_step(self, state):
            if state.step == kill_at[0]:
                os.kill(os.getpid(), signal.SIGTERM)

    callbacks = registry.callbacks
    monkeypatch.setattr(registry, "callbacks", lambda model: [*callbacks(model), Kill()])
    code, _, err = run([*argv, "--overwrite", "--out", out], capsys)
    kill_at[0] = None
    assert code == 128 + signal.SIGTERM
    (line,) = err.strip().splitlines()
    assert f"the previous run in {out} is untouched" in line and "--overwrite --resume" in line
    assert snapshot(out) == before
    assert load_checkpoint(staging_path(out))["step"] == 3
    assert run([*argv, "--out", tmp_path / "ref"], capsys)[0] == 0  # uninterrupted, same Kill

    code, _, err = run([*argv, "--overwrite", "--resume", "--out", out], capsys)
    assert code == 0, err
    assert not staging_path(out).exists()
    assert read_json(out / "run.json")["config"]["train"]["seed"] == 0
    same_files(tmp_path / "ref", out, ["adapter/adapter_model.safetensors",
                                       "adapter/adapter_config.json"])
