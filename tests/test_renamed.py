"""One spelling per concept (issue 24): ``r`` for a rank, ``target_sparsity`` for the fraction of
an update zeroed at the end, ``density`` for masked-sparse. The old spellings still work for one
release, each with a DeprecationWarning; both at once, or a contradiction, is one clear error."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import trimtune as tt
from trimtune.checkpoint import read_json, write_safetensors
from trimtune.runs import load, save
from trimtune.train import trainable_state
from trimtune.tuners import prepare_method


def test_finetune_config_r_and_target_sparsity():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings warn nothing
        cfg = tt.FinetuneConfig(method="lora", r=4, target_sparsity=0.5)
    assert (cfg.to_dict()["r"], cfg.to_dict()["target_sparsity"]) == (4, 0.5)
    assert "rank" not in cfg.to_dict() and "sparsity" not in cfg.to_dict()


def test_finetune_config_old_spellings_warn_and_mean_the_same():
    with pytest.warns(DeprecationWarning, match="rank= is deprecated, use r="):
        old = tt.FinetuneConfig(method="snella", rank=4, target_sparsity=0.5)
    with pytest.warns(DeprecationWarning, match="sparsity= is deprecated, use target_sparsity="):
        old2 = tt.FinetuneConfig(method="snella", r=4, sparsity=0.5)
    new = tt.FinetuneConfig(method="snella", r=4, target_sparsity=0.5)
    assert old == new == old2
    with pytest.warns(DeprecationWarning, match=r"\.rank is deprecated"):
        assert old.rank == 4
    with pytest.warns(DeprecationWarning):
        old.rank = 2
    assert old.r == 2
    with pytest.raises(tt.TrimtuneError, match="rank= and r= both given"):
        tt.FinetuneConfig(rank=4, r=8)


def test_old_run_json_reads_without_a_warning():
    d = tt.FinetuneConfig(method="lora", r=4, target_sparsity=0.6).to_dict()
    d["rank"], d["sparsity"] = d.pop("r"), d.pop("target_sparsity")  # a 0.1 run.json
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = tt.FinetuneConfig.from_dict(json.loads(json.dumps(d)))
    assert (cfg.r, cfg.target_sparsity) == (4, 0.6)
    assert isinstance(cfg.train, tt.TrainConfig)


def test_prepare_method_takes_r_and_the_old_rank(vit):
    model, _ = prepare_method(copy.deepcopy(vit), "lora", r=4)
    assert model.trimtune_method["r"] == 4
    with pytest.warns(DeprecationWarning, match="rank= is deprecated, use r="):
        old, _ = prepare_method(copy.deepcopy(vit), "lora", rank=4)
    assert old.trimtune_method == model.trimtune_method
    with pytest.warns(DeprecationWarning, match="rank= is deprecated"):
        tt.attach(copy.deepcopy(vit), "snella", rank=4)


def test_masked_sparse_sparsity_is_the_old_spelling_of_density(vit):
    torch.manual_seed(0)
    new, _ = prepare_method(copy.deepcopy(vit), "masked-sparse", density=0.1, mask_init="random",
                            seed=0)
    with pytest.warns(DeprecationWarning, match=r"sparsity=0.9 is deprecated, use density=0.1"):
        old, _ = prepare_method(copy.deepcopy(vit), "masked-sparse", sparsity=0.9,
                                mask_init="random", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(new.buffers(), old.buffers()))
    with pytest.raises(tt.TrimtuneError, match="both given"):
        prepare_method(copy.deepcopy(vit), "masked-sparse", density=0.1, sparsity=0.9)


def test_snella_sparsity_is_its_start_and_a_contradiction_is_refused():
    assert tt.SnellaConfig(r=4, init_sparsity=0.2).sparsity == 0.2
    assert tt.SnellaConfig(r=4, init_sparsity=0.2, sparsity=0.2).sparsity == 0.2
    with pytest.raises(tt.TrimtuneError, match=r"sparsity=0.7\) contradicts init_sparsity=0.0.*"
                                               "target_sparsity"):
        tt.SnellaConfig(r=4, sparsity=0.7)


def test_an_adapter_saved_with_rank_loads(vit, tmp_path):
    model, _ = prepare_method(copy.deepcopy(vit), "lora", r=4)
    save(model, tmp_path / "ad", method="lora")
    meta = read_json(tmp_path / "ad" / "trimtune_adapter.json")
    assert meta["r"] == 4
    # as trimtune 0.1 wrote it: rank, not r; its record as adapter_config.json, the tensors
    # under the model's own names (not yet a PEFT folder)
    meta["rank"] = meta.pop("r")
    (tmp_path / "ad" / "trimtune_adapter.json").unlink()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    write_safetensors(tmp_path / "ad" / "adapter_model.safetensors", trainable_state(model))
    again = load(copy.deepcopy(vit), tmp_path / "ad")
    assert again.trimtune_method["r"] == 4


def test_compress_takes_r_and_the_old_rank(vit):
    new = tt.compress(vit, r=4)
    with pytest.warns(DeprecationWarning, match="rank= is deprecated, use r="):
        old = tt.compress(vit, rank=4)
    ranks = new.trimtune_lowrank["ranks"]
    assert ranks == old.trimtune_lowrank["ranks"] and set(ranks.values()) == {4}


def test_build_train_step_takes_r_and_target_sparsity():
    from trimtune.train_step import build_train_step

    kw = dict(method="snella", batch_size=1, img_size=32, pretrained=False, device="cpu")
    new, _ = build_train_step("vit_tiny_patch16_224", r=4, target_sparsity=0.5, **kw)
    with pytest.warns(DeprecationWarning, match="sparsity= is deprecated, use target_sparsity="):
        old, _ = build_train_step("vit_tiny_patch16_224", rank=4, sparsity=0.5, **kw)

    def cfg(m):
        return next(iter(tt.tuners.adapter_configs(m).values()))
    assert (cfg(new).r, cfg(new).target_sparsity) == (cfg(old).r, cfg(old).target_sparsity) \
        == (4, 0.5)
