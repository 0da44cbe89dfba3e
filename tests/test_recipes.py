"""Named fine-tuning recipes (``--recipe fast|authors``), the SNELL/SNELLA regularisation and
schedule flags, and backbone drop-path: values, precedence, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from timm.layers import DropPath
from torch import nn

import trimtune as tt
from trimtune.checkpoint import read_json
from trimtune.cli import main
from trimtune.errors import TrimtuneError
from trimtune.models import set_drop_path_rate
from trimtune.runs import save_model
from trimtune.tasks import FinetuneConfig
from trimtune.recipes import recipe_table, recipe_values
from trimtune.tuners import iter_snell_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_backbone  # noqa: E402
DATA = "synthetic:classes=4,n=32,size=32"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_authors_recipe_cites_the_released_scripts():
    v = recipe_values("authors", "snella")  # scripts/vtab/snella32 + train_alloc.py defaults
    assert (v["rank"], v["batch_size"], v["lr"], v["weight_decay"], v["epochs"]) == (
        32, 8, 1e-3, 0.05, 100)
    assert (v["branch_dropout"], v["branch_drop_path"], v["drop_path"]) == (0.1, 0.1, 0.1)
    assert (v["schedule_unit"], v["alloc_interval"], v["init_sparsity"]) == ("epoch", 1, 0.01)
    assert "ema" not in v and recipe_values("authors", "snella", "fgvc")["ema"] == 0.9999
    s = recipe_values("authors", "snell")  # scripts/vtab/snell32
    assert (s["batch_size"], s["weight_decay"], s["epochs"]) == (16, 0.01, 200)
    assert "schedule_unit" not in s  # SNELL has no allocator
    fast = recipe_values("fast", "lora")
    assert fast["branch_dropout"] == 0 and fast["schedule_unit"] == "step"
    assert "| `--branch-drop-path` | 0.0 | 0.0 | 0.1 |" in recipe_table()


def test_recipe_bad_names():
    with pytest.raises(ValueError, match="unknown recipe 'paper'"):
        recipe_values("paper", "snella")
    with pytest.raises(ValueError, match="--recipe fast"):
        recipe_values("authors", "lora")


def test_set_drop_path_rate_linear_decay():
    m = tiny_backbone(depth=3)
    set_drop_path_rate(m, 0.2)
    probs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert probs == pytest.approx([0.0, 0.1, 0.2])  # timm's rule: rate * i / (depth - 1)
    assert isinstance(m.blocks[0].drop_path2, nn.Identity)
    assert isinstance(m.blocks[2].drop_path2, DropPath)
    set_drop_path_rate(m, 0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in m.blocks)
    with pytest.raises(TrimtuneError, match=r"outside \[0, 1\)"):
        set_drop_path_rate(m, 1.0)
    with pytest.raises(TrimtuneError, match="no `blocks`"):
        set_drop_path_rate(nn.Linear(2, 2), 0.1)


@pytest.mark.parametrize("kw,match", [
    (dict(branch_dropout=1.5), r"dropout=1.5 is outside \[0, 1\)"),
    (dict(branch_drop_path=-0.1), r"drop_path=-0.1 is outside \[0, 1\)"),
    (dict(drop_path_rate=1.0), r"drop-path rate 1.0 is outside \[0, 1\)"),
    (dict(alloc_interval=0), "interval=0"),
    (dict(schedule_unit="minute"), "schedule_unit 'minute' is unknown"),
])
def test_finetune_config_bad_values(kw, match):
    with pytest.raises(TrimtuneError, match=match):
        FinetuneConfig(method="snella", **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    model = tiny_backbone(depth=3)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny")


def finetune_argv(tiny_dir, out, *extra):
    return ["finetune", "--model", str(tiny_dir), "--data", DATA, "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("extra,match", [
    (["--recipe", "authors", "--method", "lora"], "--recipe fast"),
    (["--branch-dropout", "1.5"], r"outside \[0, 1\)"),
    (["--alloc-interval", "0"], "interval=0"),
    (["--drop-path", "-0.5"], r"outside \[0, 1\)"),
])
def test_cli_bad_recipe_input_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys,
                                                                extra, match):
    out = tmp_path / "run"
    code = main(finetune_argv(tiny_dir, out, *extra))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and __import__("re").search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--recipe", "paper"], ["--schedule-unit", "minute"]])
def test_cli_unknown_choice_exits_2(tiny_dir, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(finetune_argv(tiny_dir, tmp_path / "run", *extra))
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def run_recipe(tiny_dir, out, capsys, recipe, *flags) -> tuple[str, dict]:
    """``finetune --recipe RECIPE FLAGS`` on the tiny model: its stdout and saved config."""
    code = main(finetune_argv(tiny_dir, out, "--recipe", recipe, *flags))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert f"recipe {recipe} (snella, vtab): " in stdout
    return stdout, read_json(out / "run.json")["config"]


def test_cli_authors_recipe_fills_unset_flags_and_explicit_flags_win(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    stdout, cfg = run_recipe(tiny_dir, out, capsys, "authors", "--epochs", "2", "--max-steps",
                             "2", "--lr", "3e-3", "--r", "4")
    assert "--branch-dropout 0.1" in stdout
    assert (cfg["branch_dropout"], cfg["branch_drop_path"], cfg["drop_path_rate"]) == (
        0.1, 0.1, 0.1)
    assert (cfg["schedule_unit"], cfg["init_sparsity"]) == ("epoch", 0.01)
    assert cfg["train"]["batch_size"] == 8 and cfg["train"]["weight_decay"] == 0.05
    assert cfg["train"]["lr"] == 3e-3 and cfg["r"] == 4 and cfg["train"]["epochs"] == 2
    model = tt.load_model(out)
    layers = [lyr for _, lyr in iter_snell_layers(model)]
    assert layers and {type(lyr.snell_drop_path["default"]).__name__ for lyr in layers} == {
        "DropPath"}


def test_short_recipe_is_snella_only_and_fixes_the_budget_at_the_given_sparsity():
    v = recipe_values("short", "snella")
    assert (v["kernel"], v["sparsify"], v["min_density"], v["schedule_unit"]) == (
        "inner", "mask", 0.1, "epoch")
    assert v["branch_dropout"] == 0 and v["kernel_lr_scale"] == 0.01  # the rest is fast's
    assert "| `--init-sparsity` | (flag default) | = --sparsity |" in recipe_table()
    with pytest.raises(ValueError, match="--method snella"):
        recipe_values("short", "lora")


def test_cli_short_recipe_fills_unset_flags_and_explicit_flags_win(tiny_dir, tmp_path, capsys):
    stdout, cfg = run_recipe(tiny_dir, tmp_path / "run", capsys, "short", "--sparsity", "0.5",
                             "--epochs", "1", "--max-steps", "2", "--min-density", "0.2")
    assert "--init-sparsity 0.5" in stdout
    assert (cfg["kernel"], cfg["init_sparsity"], cfg["target_sparsity"]) == ("inner", 0.5, 0.5)
    assert cfg["method_kwargs"]["sparsify"] == "mask" and cfg["schedule_unit"] == "epoch"
    assert cfg["method_kwargs"]["min_density"] == 0.2  # given: wins over the recipe's 0.1
    code = main(finetune_argv(tiny_dir, tmp_path / "lora", "--recipe", "short", "--method",
                              "lora"))
    err = capsys.readouterr().err
    assert code == 2 and "--method snella" in err and not (tmp_path / "lora").exists()
