"""Fine-tuning runs are never lost or silently wrong: no implicit resume, overwrite refused unless
asked, a failing re-run leaves the old run usable, resume refuses changed settings, the best
epoch after a resume equals the uninterrupted run's bit for bit, one seed fixes every bit (the
new head included), validation never overlaps training, ranks above min(d_in, d_out) refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trimtune as tt
import trimtune.tasks as tasks
from trimtune.checkpoint import read_json, read_safetensors
from trimtune.data import split_spec
from trimtune.runs import load_model, merge, save_model
from trimtune.tasks import FinetuneConfig, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_backbone  # noqa: E402
DATA = "synthetic:classes=4,n=32,size=32"

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, method: str = "snella", *, epochs: int = 2, **train) -> FinetuneConfig:
    tc = tt.TrainConfig(**{**dict(epochs=epochs, batch_size=8, lr=3e-3, min_lr=1e-5,
                                  weight_decay=0.0, out_dir=out, progress=False), **train})
    return FinetuneConfig(method=method, rank=4, sparsity=0.5, train=tc)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------------------- lost runs


def test_second_finetune_into_a_finished_run_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    finetune(tiny_backbone(), DATA, config(out))
    before = snapshot(out)
    with pytest.raises(tt.TrimtuneError, match="already holds a run: pass --overwrite"):
        finetune(tiny_backbone(), DATA, config(out, lr=1e-2))
    assert snapshot(out) == before


def test_docstring_example_distill_then_finetune_needs_no_out_dir(tmp_path, monkeypatch):
    """The package docstring's example: no out_dir anywhere, two runs, two folders."""
    monkeypatch.chdir(tmp_path)
    teacher = tiny_backbone()
    student = tt.compress(teacher, ratio=2.0)
    d = tt.distill(student, teacher, DATA, tt.DistillConfig(
        train=tt.TrainConfig(epochs=1, batch_size=8, progress=False)))
    run = tt.finetune(student, DATA, FinetuneConfig(method="snella", rank=4, train=tt.TrainConfig(
        epochs=1, batch_size=8, progress=False)))
    assert d.out_dir != run.out_dir and run.history[0]["step"] >= 1  # trained, not "resumed"
    assert (run.out_dir / "adapter" / "adapter_config.json").is_file()


def test_failing_overwrite_leaves_the_old_run_usable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = finetune(tiny_backbone(), DATA, config(out, "lora"), test_data=DATA + "@test")
    before = snapshot(out)

    def broken(*a, **k):  # the new run fails at its very end, while writing its plots
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tasks, "plot_curves", broken)
    with pytest.raises(OSError):
        finetune(tiny_backbone(), DATA, config(out, "lora", lr=1e-2, overwrite=True))
    assert snapshot(out) == before
    assert not any(p.name.startswith(".run") for p in tmp_path.iterdir())
    # and it still loads, merges and gives the same logits
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        again = load_model(str(out)).eval()(x)
        torch.testing.assert_close(again, first.model.eval()(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(merge(load_model(str(out))).eval()(x), again, atol=1e-5,
                                   rtol=0)

    monkeypatch.undo()
    finetune(tiny_backbone(), DATA, config(out, "lora", lr=1e-2, overwrite=True))
    assert read_json(out / "run.json")["config"]["train"]["lr"] == 1e-2
    assert not (out / "confusion.png").exists()  # no stale plot of the replaced run


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("change", [{"method": "lora"}, {"r": 2}, {"lr": 1e-2},
                                    {"target_sparsity": 0.3}])
def test_resume_with_a_changed_setting_is_refused(tmp_path, change):
    out = tmp_path / "run"
    finetune(tiny_backbone(), DATA, config(out, max_steps=3))
    cfg = config(out, resume=True)
    (key, value), = change.items()
    if key == "lr":
        cfg.train.lr = value
    else:
        setattr(cfg, key, value)
    before = snapshot(out)
    with pytest.raises(tt.TrimtuneError, match=rf"cannot resume .*: {key}=.*differs from the "
                                               rf"checkpoint's {key}="):
        finetune(tiny_backbone(), DATA, cfg)
    assert (out / "checkpoint" / "state.pt").read_bytes() == before["checkpoint/state.pt"]


@pytest.mark.parametrize("stop_at", [4, 6])  # 4 steps per epoch: at an epoch end, mid-epoch
def test_best_epoch_after_resume_equals_uninterrupted_bit_for_bit(tmp_path, stop_at):
    """Validation picks the best epoch; the choice (weights + SNELLA sparsities + value) is
    in the checkpoint, so the resumed run saves the very adapter the uninterrupted one saves."""
    val = DATA + "@val"

    def cfg(out, **kw):
        c = config(out, epochs=4, **kw)
        c.train.lr = 0.05  # large steps: the epochs differ and the best is not the last
        return c

    full = finetune(tiny_backbone(), DATA, cfg(tmp_path / "full"), eval_data=val)
    finetune(tiny_backbone(), DATA, cfg(tmp_path / "cut", max_steps=stop_at), eval_data=val)
    torch.manual_seed(1234)
    cut = finetune(tiny_backbone(), DATA, cfg(tmp_path / "cut", resume=True), eval_data=val)
    assert cut.best == full.best
    a = read_safetensors(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (read_json(tmp_path / "full" / "adapter" / "adapter_config.json")
            == read_json(tmp_path / "cut" / "adapter" / "adapter_config.json"))


def test_resume_of_a_finished_run_returns_its_selected_model(tmp_path):
    val = DATA + "@val"
    full = finetune(tiny_backbone(), DATA, config(tmp_path / "r", epochs=3), eval_data=val)
    again = finetune(tiny_backbone(), DATA, config(tmp_path / "r", epochs=3, resume=True),
                     eval_data=val)
    assert again.best == full.best
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), full.model.eval()(x))


# ----------------------------------------------------------------------------- seeds


def cli(args: list, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra,
           "PYTHONPATH": os.pathsep.join([str(Path(tt.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "trimtune.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_same_seed_same_bits_head_included(tmp_path):
    """Two identical commands in fresh processes (other hash seeds, other torch RNG states
    before the run) write identical adapters; the model has 7 classes, the data 4: the new
    head is created by the run and must be seeded too."""
    base = save_model(tiny_backbone(num_classes=7), tmp_path / "base7")
    args = ["finetune", "--model", base, "--data", DATA, "--method", "snella", "--r", "4",
            "--epochs", "2", "--batch-size", "8", "--no-progress"]
    runs = []
    for i, hashseed in enumerate(["1", "2"]):
        r = cli([*args, "--seed", "3", "--out", tmp_path / f"s{i}"], {"PYTHONHASHSEED": hashseed})
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(read_safetensors(tmp_path / f"s{i}" / "adapter" / "adapter_model.safetensors"))
    assert runs[0].keys() == runs[1].keys() and "head.weight" in str(list(runs[0]))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # and in-process, with the global RNG disturbed between the two runs
    outs = []
    for i, disturb in enumerate([0, 99]):
        torch.manual_seed(disturb)
        torch.rand(17)
        from trimtune.cli import main
        assert main([str(a) for a in [*args, "--seed", "3", "--out", tmp_path / f"p{i}"]]) == 0
        outs.append(read_safetensors(tmp_path / f"p{i}" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(outs[0][k], runs[0][k]) for k in runs[0])
    assert all(torch.equal(outs[1][k], runs[0][k]) for k in runs[0])
    # another seed: another head
    assert main([str(a) for a in [*args, "--seed", "4", "--out", tmp_path / "other"]]) == 0
    other = read_safetensors(tmp_path / "other" / "adapter" / "adapter_model.safetensors")
    head = next(k for k in runs[0] if k.endswith("head.weight"))  # PEFT may prefix the name
    assert not torch.equal(other[head], runs[0][head])


# ----------------------------------------------------------------------------- validation


def test_validation_held_out_of_the_kshot_set_trains_on_the_rest(tmp_path, capsys):
    r = finetune(tiny_backbone(), "synthetic:20", config(tmp_path / "run", "linear", epochs=1),
                 eval_data="synthetic:20@val")
    assert "training on synthetic:20@train800" in capsys.readouterr().out
    data = read_json(tmp_path / "run" / "run.json")["data"]
    assert data["spec"] == "synthetic:20@train800" and data["num_images"] == 16
    train = tt.load_dataset("synthetic:20", "train800")
    val = tt.load_dataset("synthetic:20", "val")
    assert r.best["val_acc"] is not None and len(train) + len(val) == 20
    # disjoint: no validation image is among the training images
    timgs = {bytes(train[i][0].tobytes()) for i in range(len(train))}
    assert not any(bytes(val[i][0].tobytes()) in timgs for i in range(len(val)))


@pytest.mark.parametrize("train,val,expect", [
    ("fashion-mnist:1k", "fashion-mnist:1k@val", "train800"),
    ("digits", "digits@val", "train90"),
    ("digits:100@train800", "digits:100@val", None),
    ("digits:100", "mnist-5k:100@val", None),
    ("digits", "digits@test", None),
])
def test_train_split_beside_validation(train, val, expect):
    name, split = split_spec(train, "train")
    vname, vsplit = split_spec(val, "val")
    assert tt.data.train_split_beside(name, split, vname, vsplit) == expect


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize("method,rank", [("snella", 22), ("snell", 100000), ("lora", 65),
                                         ("adalora", 43)])
def test_rank_above_min_dim_is_refused_before_any_allocation(method, rank, tmp_path):
    """qkv is 64 -> 192, split in 3 units of 64 -> 64 for SNELL; with a compressed model the
    factors are narrower still; AdaLoRA starts at 1.5 x rank."""
    model = tt.compress(tiny_backbone(), ratio=2.0)  # ranks 21 / 25...: the narrowest limit
    narrowest = min(min(m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.startswith("blocks."))
    cfg = config(tmp_path / "run", method)
    cfg.r = rank
    with pytest.raises(tt.TrimtuneError, match=rf"rank \d+ is above min\(d_in, d_out\) = "
                                               rf"{narrowest} of target layer"):
        finetune(model, DATA, cfg)
    cfg.r = narrowest if method != "adalora" else narrowest * 2 // 3
    tasks.prepare(tt.compress(tiny_backbone(), ratio=2.0), cfg)  # the limit itself is fine


def test_one_class_dataset_is_refused(tmp_path):
    from PIL import Image
    folder = tmp_path / "one" / "cats"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(tt.TrimtuneError, match="has 1 class: fine-tuning a classifier needs 2"):
        finetune(tiny_backbone(), str(tmp_path / "one"), config(tmp_path / "run", "linear"))
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.slow
def test_sigterm_to_the_cli_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    import signal
    import time
    base = save_model(tiny_backbone(), tmp_path / "base")
    out = tmp_path / "run"
    args = ["finetune", "--model", base, "--data", DATA, "--method", "lora", "--r", "2",
            "--epochs", "300", "--batch-size", "8", "--no-progress", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(tt.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "trimtune.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM at optimizer step" in lines[0], err
    assert "--resume" in lines[0] and "Traceback" not in err
    step = read_json(out / "checkpoint" / "meta.json")["step"]
    assert step >= 1  # how many steps ran before the signal depends on the machine's load
    # resuming with a shorter horizon is a changed setting: refused, one line
    r = cli([*args[:-2], "--out", out, "--resume", "--epochs", "2"], {})
    assert r.returncode == 2 and "epochs=2 differs from the checkpoint's epochs=300" in r.stderr
    r = cli([*args, "--resume", "--max-steps", str(step + 4)], {})
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_json(out / "checkpoint" / "meta.json")["step"] == step + 4


def test_ema_is_what_is_selected_and_saved(tmp_path):
    """Before: --ema changed nothing that was saved. Now the average is evaluated, selected
    and saved; the checkpoint keeps the trained weights for resume."""
    plain = finetune(tiny_backbone(), DATA, config(tmp_path / "plain", "lora"))
    avg = finetune(tiny_backbone(), DATA, config(tmp_path / "ema", "lora", ema=0.5))
    a = read_safetensors(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(tmp_path / "ema" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    live = torch.load(tmp_path / "ema" / "checkpoint" / "state.pt", weights_only=False)
    ema_state = live["ema"]
    # the saved adapter (PEFT's keys) is the EMA average, not the trained weights: loaded back,
    # every trained tensor is the average's
    trained = {n: p for n, p in load_model(tmp_path / "ema").named_parameters()
               if p.requires_grad}
    assert len(trained) == len(b)
    for n, v in trained.items():
        key = n if n in ema_state else "module." + n
        assert torch.equal(v, ema_state[key]), n
    # the model finetune returns is the one it saved: the EMA average for --ema
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {}
        for name, r in (("plain", plain), ("ema", avg)):
            out[name] = r.model.eval()(x)
            torch.testing.assert_close(load_model(tmp_path / name).eval()(x), out[name],
                                       atol=1e-5, rtol=0)
    assert not torch.allclose(out["plain"], out["ema"], atol=1e-4)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_outside_training_says_what_is_kept(tmp_path, monkeypatch, capsys, checkpoint):
    import trimtune.cli as cli_mod
    out = tmp_path / "run"
    if checkpoint:
        finetune(tiny_backbone(), DATA, config(out, "linear", epochs=1))

    def interrupted(a):  # e.g. Ctrl-C while the model loads, or during the final test eval
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "cmd_finetune", interrupted)
    code = cli_mod.main(["finetune", "--model", "m", "--data", DATA, "--out", str(out),
                         *(["--resume"] if checkpoint else [])])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1
    if checkpoint:
        assert "is kept: run the same command with --resume" in err
    else:
        assert "nothing to resume" in err and "--resume" not in err
