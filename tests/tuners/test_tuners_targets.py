"""The one target rule's defaults: timm, PEFT's per-model-type mapping for transformers models,
block linears for model types PEFT does not know; the partial-coverage warning."""

import sys
import warnings
from pathlib import Path

import pytest

from trimtune.lowrank import compress
from trimtune.tuners import SnellaConfig, SnellLinear, attach
from trimtune.tuners.targets import block_linears, default_targets, select_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import hf_bert, hf_clip_vision, hf_llama, hf_qwen2, hf_vit, tiny_vit  # noqa: E402


def no_warning(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*a, **kw)


@pytest.mark.parametrize("builder,kinds", [
    (hf_vit, {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
              "mlp.fc1", "mlp.fc2"}),
    (hf_clip_vision, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}),
])
def test_model_type_peft_does_not_know_gets_every_block_linear_silently(builder, kinds):
    model = builder()
    assert set(block_linears(model).values()) == kinds
    names = no_warning(select_linears, model)
    assert len(names) == 12 and set(names) == set(block_linears(model))
    assert "classifier" not in names


@pytest.mark.parametrize("builder,peft_default,left_out", [
    (hf_llama, ["q_proj", "v_proj"], "self_attn.k_proj, self_attn.o_proj, mlp.gate_proj, "
                                     "mlp.up_proj, mlp.down_proj (10 layers)"),
    (hf_qwen2, ["q_proj", "v_proj"], "self_attn.k_proj"),
    (hf_bert, ["query", "value"], "attention.self.key, attention.output.dense, "
                                  "intermediate.dense, output.dense (8 layers)"),
])
def test_known_model_type_uses_peft_mapping_and_warns_what_it_leaves_out(builder, peft_default,
                                                                         left_out):
    model = builder()
    assert default_targets(model) == peft_default
    with pytest.warns(UserWarning, match=r"PEFT's default target_modules for .* covers 4 of "):
        names = select_linears(model)
    assert len(names) == 4 and all(n.rsplit(".", 1)[-1] in peft_default for n in names)
    with pytest.warns(UserWarning, match=left_out.replace("(", r"\(").replace(")", r"\)")):
        select_linears(model)
    no_warning(select_linears, model, "all-linear", modules_to_save=["lm_head", "pooler"])


def test_same_default_for_every_method():
    """SNELLA (trimtune's tuner) and LoRA (PEFT's) adapt the same default layers: those the one
    rule (targets.select_linears) picks."""
    import trimtune as tt

    with pytest.warns(UserWarning, match="covers 4 of"):
        rule = set(select_linears(hf_llama()))
    with pytest.warns(UserWarning, match="covers 4 of"):
        snella = attach(hf_llama(), SnellaConfig(r=2, modules_to_save=None, train_tokens=None),
                        probe=False)
    with pytest.warns(UserWarning, match="covers 4 of"):
        lora = tt.attach(hf_llama(), "lora", r=2, modules_to_save=(), probe=False)
    lora_names = {n for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    snella_names = {n for n, m in snella.named_modules() if isinstance(m, SnellLinear)}
    assert snella_names == lora_names == rule
    assert len(rule) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in rule)


def test_partial_pattern_warns_naming_the_kinds_left_out():
    with pytest.warns(UserWarning, match=r"target_modules='.\*fc1' covers 2 of the 12 .*not "
                                         r"adapted: attention.q_proj, .*mlp.fc2 \(10 layers\)"):
        select_linears(hf_vit(), ".*fc1")
    no_warning(select_linears, hf_vit(), ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"])


def test_timm_default_covers_every_vit_block_linear_and_compressed_counts_once():
    vit = tiny_vit()
    assert len(no_warning(select_linears, vit)) == 8
    small = compress(vit, ratio=2.0)
    names = no_warning(select_linears, small)
    assert len(names) == 8 and all(n.endswith(".second") for n in names)
    with pytest.warns(UserWarning, match=r"not adapted: attn.proj, mlp.fc1, mlp.fc2"):
        select_linears(small, ["qkv"])
