"""LoRA / DoRA / AdaLoRA adapters are saved by PEFT's rules (issue 24, item 5):
``peft.PeftModel.from_pretrained(<the same base>, folder)`` opens a run's adapter and computes
the tuned model's logits, head included (PEFT's ``modules_to_save``); trimtune's own loaders read
the new folders and still read those written before (trimtune's tensors + record)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import trimtune as tt
from trimtune import runs
from trimtune.checkpoint import read_json, write_json, write_safetensors
from trimtune.tasks import FinetuneConfig, finetune
from trimtune.train import trainable_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import move_off_init, tiny_backbone  # noqa: E402

DATA = "synthetic:classes=4,n=32,size=32"
pytestmark = pytest.mark.usefixtures("one_thread")


def tuned(method: str, **options) -> torch.nn.Module:
    """``method`` attached to the tiny base, every trained tensor moved off its init."""
    return move_off_init(tt.attach(tiny_backbone(), method, r=4, **options), 0.1).eval()


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images())


def save_old_format(model: torch.nn.Module, out: Path, method: str) -> Path:
    """The folder trimtune wrote before LoRA runs were PEFT folders: the trained tensors under
    the model's own names and trimtune's record as adapter_config.json."""
    state = trainable_state(model)
    write_safetensors(out / "adapter_model.safetensors", state, metadata={"format": "pt"})
    write_json(out / "adapter_config.json", {
        **model.trimtune_method, "method": method,
        "base": {"arch": runs.base_arch(model), "num_params": runs._base_numel(model)},
        "num_tensors": len(state), "trimtune_version": tt.__version__})
    return out


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_peft_opens_the_saved_adapter_head_included(tmp_path, method):
    from peft import PeftConfig, PeftModel

    options = {"total_step": 10} if method == "adalora" else {}
    model = tuned(method, **options)
    want = logits(model)
    folder = runs.save(model, tmp_path / "ad")
    with warnings.catch_warnings(record=True) as seen:  # PEFT reads it without a warning
        warnings.simplefilter("always")
        cfg = PeftConfig.from_pretrained(str(folder))
        pm = PeftModel.from_pretrained(tiny_backbone(), str(folder))
    assert [str(w.message) for w in seen] == []
    assert cfg.modules_to_save == ["head"]
    assert (cfg.init_r, cfg.target_r) == (6, 4) if method == "adalora" else cfg.r == 4
    assert bool(getattr(cfg, "use_dora", False)) == (method == "dora")
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(tiny_backbone()), want, atol=1e-3)  # the head did train
    record = read_json(folder / "trimtune_adapter.json")
    assert record["method"] == method and record["base"]["arch"]
    # trimtune's own loader, onto a fresh base
    back = runs.load(tiny_backbone(), folder)
    torch.testing.assert_close(logits(back), want, atol=1e-5, rtol=0)


def test_old_format_folder_still_loads(tmp_path):
    model = tuned("lora")
    folder = save_old_format(model, tmp_path / "old", "lora")
    assert "peft_type" not in read_json(folder / "adapter_config.json")
    back = runs.load(tiny_backbone(), folder)
    torch.testing.assert_close(logits(back), logits(model), atol=1e-6, rtol=0)


def test_wrong_base_is_refused(tmp_path):
    folder = runs.save(tuned("lora"), tmp_path / "ad")
    with pytest.raises(tt.TrimtuneError, match="base"):
        runs.load(tiny_backbone(depth=3), folder)


def config(out: Path, method: str) -> FinetuneConfig:
    return FinetuneConfig(method=method, r=4, train=tt.TrainConfig(
        epochs=1, batch_size=8, lr=3e-3, weight_decay=0.0, out_dir=out, progress=False, seed=3))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_run_round_trip_same_bytes_and_old_runs(tmp_path, method):
    """A run: load_model(run) gives the tuned logits; two same-seed runs write the same bytes;
    the run with its adapter rewritten in the old format still loads. AdaLoRA's budget has
    allocated a rank pattern by then: saved unpruned, the live pattern untouched."""
    from peft import PeftModel

    a = finetune(tiny_backbone(), DATA, config(tmp_path / "a", method))
    finetune(tiny_backbone(), DATA, config(tmp_path / "b", method))
    if method == "adalora":
        pattern = a.model.peft_config["default"].rank_pattern
        assert pattern and all(".default" in k for k in pattern)
    folders = [tmp_path / r / "adapter" for r in "ab"]
    assert sorted(p.name for p in folders[0].iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "trimtune_adapter.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "trimtune_adapter.json"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    want = logits(a.model)
    torch.testing.assert_close(logits(runs.load_model(tmp_path / "a")), want, atol=1e-5, rtol=0)
    pm = PeftModel.from_pretrained(tiny_backbone(), str(folders[0]))
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)
    # the same run, its adapter as trimtune wrote it before
    model = runs.load_model(tmp_path / "a")
    for f in folders[0].iterdir():
        f.unlink()
    save_old_format(model, folders[0], method)
    torch.testing.assert_close(logits(runs.load_model(tmp_path / "a")), want, atol=1e-5, rtol=0)
