"""The ``trimtune`` command line end to end on a tiny random ViT and synthetic data, every
sub-command's --help, and every bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trimtune as tt
from trimtune.checkpoint import read_json
from trimtune.cli import build_parser, main
from trimtune.data import build_transform, load_dataset
from trimtune.runs import load_model, save_model
from trimtune.tuners.snell.kernels import KERNELS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_backbone  # noqa: E402
DATA = "synthetic:classes=4,n=32,size=32"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random-init tiny ViT written as a trimtune model folder (the CLI's --model DIR)."""
    return save_model(tiny_backbone(), tmp_path_factory.mktemp("models") / "tiny")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@torch.no_grad()
def test_images(model) -> torch.Tensor:
    ds = load_dataset(DATA, "test", transform=build_transform(model))
    return torch.stack([ds[i][0] for i in range(len(ds))])


test_images.__test__ = False  # a helper, not a test


# ----------------------------------------------------------------------------- listing


@pytest.mark.slow
def test_version_in_a_real_subprocess():
    exe = shutil.which("trimtune", path=str(Path(sys.executable).parent)) or shutil.which(
        "trimtune")
    cmd = [exe] if exe else [sys.executable, "-m", "trimtune.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"trimtune {tt.__version__}"


def test_models_and_datasets(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    for z in tt.list_zoo():
        assert z["name"] in out
    code, out, _ = run(["datasets"], capsys)
    assert code == 0
    for name in ("digits", "fashion-mnist", "mnist-5k", "synthetic"):
        assert name in out


def sub_parsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    (action,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_of_every_subcommand_lists_every_flag(capsys):
    subs = sub_parsers()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert set(subs) >= {"models", "datasets", "compress", "distill", "finetune", "evaluate",
                         "merge", "quickstart", "bench"}
    for name, parser in subs.items():
        assert name in top
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"`trimtune {name} --help` does not mention {flag}"
            if not action.option_strings:  # a positional: its name or its choices
                shown = action.metavar or (
                    "{" + ",".join(action.choices) + "}" if action.choices else action.dest)
                assert shown in text, f"`trimtune {name} --help` does not show {shown}"


@pytest.mark.parametrize("command", [["finetune", "--model", "m", "--data", "d", "--out", "o"],
                                     ["compress", "--model", "m", "--out", "o"],
                                     ["quickstart"]])
def test_r_is_the_rank_flag_and_rank_still_works_with_one_warning(command, capsys):
    """``--r`` spells the rank as PEFT and SnellaConfig do; the old ``--rank`` gives the same
    value and one deprecation line on stderr."""
    new = build_parser().parse_args([*command, "--r", "4"])
    assert new.rank == 4 and capsys.readouterr().err == ""
    old = build_parser().parse_args([*command, "--rank", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert old.rank == 4 and vars(old) == vars(new)
    assert err == [f"trimtune {command[0]}: warning: --rank is deprecated: use --r (same "
                   "meaning)"]


def test_kernel_choices_are_the_real_kernels():
    (kernel,) = [a for a in sub_parsers()["finetune"]._actions if a.dest == "kernel"]
    assert tuple(kernel.choices) == KERNELS


# ----------------------------------------------------------------------------- pipeline


def test_compress_finetune_evaluate_merge(tiny_dir, tmp_path, capsys):
    comp = tmp_path / "compressed"
    code, out, err = run(["compress", "--model", tiny_dir, "--ratio", "2", "--out", comp], capsys)
    assert code == 0, err
    assert (comp / "trimtune.json").is_file() and (comp / "spectra.png").is_file()
    student = load_model(str(comp))
    assert tt.is_compressed(student)
    n_dense = sum(p.numel() for p in load_model(str(tiny_dir)).parameters())
    assert sum(p.numel() for p in student.parameters()) < n_dense

    ft = tmp_path / "run"
    code, out, err = run(["finetune", "--model", comp, "--method", "snella", "--data", DATA,
                          "--test-data", DATA + "@test", "--r", "4", "--sparsity", "0.5",
                          "--epochs", "2", "--batch-size", "8", "--lr", "3e-3",
                          "--weight-decay", "0", "--no-progress", "--out", ft], capsys)
    assert code == 0, err
    assert "test top-1" in out
    for f in ("run.json", "metrics.jsonl", "results.json", "adapter/adapter_config.json",
              "curves.png", "sparsity.png", "confusion.png"):
        assert (ft / f).is_file(), f
    test_top1 = read_json(ft / "results.json")["test_top1"]

    code, out, err = run(["evaluate", "--model", ft, "--data", DATA, "--split", "test"], capsys)
    assert code == 0, err
    assert read_json(ft / "eval_test.json")["top1"] == test_top1
    assert (ft / "confusion_test.png").is_file()

    merged = tmp_path / "merged"
    code, out, err = run(["merge", ft, "--out", merged], capsys)
    assert code == 0, err
    plain, tuned = load_model(str(merged)), load_model(str(ft))
    assert tt.is_compressed(plain) and not hasattr(plain, "trimtune_adapter")
    x = test_images(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), tuned.eval()(x), atol=1e-5, rtol=0)
    code, out, err = run(["evaluate", "--model", merged, "--data", DATA, "--out", tmp_path],
                         capsys)
    assert code == 0, err
    assert read_json(tmp_path / "eval_test.json")["top1"] == test_top1


def test_finetune_baseline_from_dense_folder(tiny_dir, tmp_path, capsys):
    ft = tmp_path / "lora"
    code, out, err = run(["finetune", "--model", tiny_dir, "--method", "lora", "--data", DATA,
                          "--r", "2", "--epochs", "1", "--batch-size", "8",
                          "--no-progress", "--out", ft], capsys)
    assert code == 0, err
    code, out, err = run(["merge", ft, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    plain, tuned = load_model(str(tmp_path / "merged")), load_model(str(ft))
    x = test_images(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), tuned.eval()(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


def bad_inputs(tiny_dir: Path, tmp: Path) -> dict[str, list]:
    empty = tmp / "not_a_model"
    out = tmp / "out"
    return {
        "unknown model": ["compress", "--model", "vit_tinyy_patch16_224", "--out", out],
        "missing weights": ["compress", "--model", "vit_tiny_patch16_224", "--weights",
                            tmp / "missing.safetensors", "--out", out],
        "ratio 1": ["compress", "--model", tiny_dir, "--ratio", "1", "--out", out],
        "ratio 0.5": ["compress", "--model", tiny_dir, "--ratio", "0.5", "--out", out],
        "energy 1.5": ["compress", "--model", tiny_dir, "--energy", "1.5", "--out", out],
        "energy 0": ["compress", "--model", tiny_dir, "--energy", "0", "--out", out],
        "calib without a data-aware init": ["compress", "--model", tiny_dir, "--calib", DATA,
                                            "--out", out],
        "whiten without calib": ["compress", "--model", tiny_dir, "--init", "whiten",
                                 "--out", out],
        "calib images 0": ["compress", "--model", tiny_dir, "--init", "asvd", "--calib", DATA,
                           "--calib-images", "0", "--out", out],
        "unknown calib data": ["compress", "--model", tiny_dir, "--init", "whiten", "--calib",
                               "no-such-data", "--out", out],
        "unknown dataset": ["finetune", "--model", tiny_dir, "--data", "no-such-data",
                            "--out", out],
        "img size": ["compress", "--model", "vit_tiny_patch16_224", "--img-size", "30",
                     "--out", out],
        "img size of a saved model": ["evaluate", "--model", tiny_dir, "--img-size", "64",
                                      "--data", DATA],
        "not a trimtune folder": ["evaluate", "--model", empty, "--data", DATA],
        "merge of a non-run": ["merge", empty, "--out", out],
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("m"), Path("t"))))
def test_bad_input_one_line_exit_2(case, tiny_dir, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    argv = bad_inputs(tiny_dir, tmp_path)[case]
    code, out, err = run(argv, capsys)
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (case, err)
    assert lines[0].startswith(f"trimtune {argv[0]}: error: ") and "Traceback" not in err
    assert not (tmp_path / "out" / "trimtune.json").exists()


def test_compress_whiten_records_init(tiny_dir, tmp_path, capsys):
    out = tmp_path / "w"
    code, _, err = run(["compress", "--model", tiny_dir, "--ratio", "2", "--init", "whiten",
                        "--calib", DATA, "--calib-images", "2", "--no-plot", "--out", out], capsys)
    assert code == 0, err
    # 2 images are too few for a full-rank Gram matrix: said in one line, still written
    assert err.strip().startswith("trimtune compress: warning: whitening:")
    assert len(err.strip().splitlines()) == 1
    init = read_json(out / "trimtune.json")["init"]
    assert init["method"] == "whiten" and init["calib"] == DATA and init["calib_images"] == 2
    with pytest.raises(SystemExit) as e:  # an unknown init name: argparse's exit 2
        main(["compress", "--model", str(tiny_dir), "--init", "pca", "--out", str(out)])
    assert e.value.code == 2 and "invalid choice: 'pca'" in capsys.readouterr().err


def test_unknown_method_is_an_argparse_error(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", str(tiny_dir), "--data", DATA, "--method", "lorax",
              "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lorax'" in err and "Traceback" not in err


def test_help_shows_defaults_and_a_runnable_example(capsys):
    """Every sub-command's --help ends with an example that the parser accepts, and every
    option with a default value shows it."""
    import shlex

    from trimtune.cli import EXAMPLES
    subs = sub_parsers()
    assert set(EXAMPLES) == set(subs)
    for name, parser in subs.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        example = EXAMPLES[name]
        assert f"example: {example}" in text, name
        argv = shlex.split(example)
        assert argv[0] == "trimtune" and argv[1] == name
        a = build_parser().parse_args(argv[1:])  # runnable: the parser takes it as written
        assert a.func.__name__ == f"cmd_{name}"
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and action.help != argparse.SUPPRESS:
                shown = action.help if "default" in (action.help or "") else \
                    parser.formatter_class("x")._get_help_string(action)
                assert "default" in shown, f"`trimtune {name} --help`: {action.dest} default"
