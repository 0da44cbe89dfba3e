"""PELA distillation objective and weight-perturbation regulariser, on tiny random ViTs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from trimtune.errors import TrimtuneError
from trimtune.lowrank import LowRankLinear, compress, factorised_layers
from trimtune.lowrank.distill import (DistillConfig, DistillObjective, set_trainable,
                                      teacher_weights, weight_perturbation)
from trimtune.train import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_vit  # noqa: E402


def teacher_vit(num_classes: int = 5):
    """The suite's tiny ViT at width 32 (full rank 32 below)."""
    return tiny_vit(num_classes, embed_dim=32)


def full_rank(teacher):
    """Exact factorisation of every linear (rank = min(in, out)): same function as the teacher."""
    return compress(teacher, r=32, exclude=["head"], keep_dense_if_no_saving=False)


@pytest.fixture
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_loss_is_zero_for_full_rank_student(x):
    teacher = teacher_vit()
    student = full_rank(teacher)
    assert len(factorised_layers(student)) == 8  # qkv, proj, fc1, fc2 in 2 blocks
    for form in ("max", "smooth"):
        obj = DistillObjective(teacher, final_weight=1.0, logits_weight=1.0, logits_loss="kl",
                               temperature=2.0, ce_weight=0.0, reg_weight=1.0, reg_form=form)
        loss, logs = obj(student, x)
        assert set(logs) == {"block", "final", "logits", "reg"}
        assert loss.item() < 1e-6, logs  # float32 rounding only (KL of softmaxes)
    # ... and clearly non-zero for a real (ratio 2) compression
    loss, logs = DistillObjective(teacher, reg_weight=1.0)(compress(teacher, ratio=2.0), x)
    assert logs["block"] > 1e-4 and logs["reg"] > 1e-4


def test_layernorm_features_compare_each_token_up_to_its_scale_and_shift(x):
    from trimtune.lowrank.distill import _mse
    t = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    s = 3.0 * t + 0.5  # the same tokens, another scale and offset
    assert _mse(s, t, None, "none") > 1.0
    assert _mse(s, t, None, "layernorm") < 1e-6
    teacher = teacher_vit()
    obj = DistillObjective(teacher, final_weight=1.0, ce_weight=0.0, feature_norm="layernorm")
    assert obj(full_rank(teacher), x)[0].item() < 1e-6  # the same function: still zero
    raw = DistillObjective(teacher, final_weight=1.0, ce_weight=0.0)
    student = compress(teacher, ratio=2.0)
    assert obj(student, x)[1]["block"] != raw(student, x)[1]["block"]


def test_full_token_sequence_and_one_student_forward(x):
    teacher = teacher_vit()
    student = compress(teacher, ratio=2.0)
    calls = []
    student.blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    DistillObjective(teacher, logits_weight=1.0)(student, (x, torch.tensor([0, 1, -1, 2])))
    assert calls == [torch.Size([4, 1 + 16, 32])]  # one forward, cls token + 4x4 patches


def test_labels_optional(x):
    teacher = teacher_vit()
    student = compress(teacher, ratio=2.0)
    obj = DistillObjective(teacher)
    assert "ce" not in obj(student, x)[1]
    assert "ce" not in obj(student, (x, torch.full((4,), -1)))[1]
    assert "ce" in obj(student, (x, torch.tensor([0, 1, -1, 2])))[1]


def test_regulariser_gradient_reaches_only_student_factors():
    teacher = teacher_vit()
    student = compress(teacher, ratio=2.0)
    with torch.no_grad():
        for layer in factorised_layers(student).values():
            layer.first.weight.add_(0.01 * torch.randn_like(layer.first.weight))
    tw = teacher_weights(teacher, list(factorised_layers(student)))
    for form in ("max", "smooth"):
        student.zero_grad(set_to_none=True)
        weight_perturbation(student, tw, eps=1e-3, form=form).backward()
        factor_ids = {id(p) for m in factorised_layers(student).values()
                      for p in (m.first.weight, m.second.weight)}
        for name, p in student.named_parameters():
            if id(p) in factor_ids:
                assert p.grad is not None and torch.isfinite(p.grad).all()
                assert p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
        assert all(p.grad is None for p in teacher.parameters())
    # smooth: every element of the difference gets gradient, max: only one per factor product
    student.zero_grad(set_to_none=True)
    w = factorised_layers(student)["blocks.0.attn.qkv"]
    weight_perturbation(student, tw, form="smooth").backward()
    assert (w.second.weight.grad != 0).float().mean() > 0.9
    with pytest.raises(TrimtuneError, match="no teacher weight"):
        weight_perturbation(student, {}, form="max")


def test_fit_trains_student_never_teacher(tmp_path):
    teacher = teacher_vit()
    before = copy.deepcopy(teacher.state_dict())
    student = compress(teacher, ratio=2.0)
    s_before = copy.deepcopy(student.state_dict())
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, -1, -1, 4, 0]))
    cfg = DistillConfig(train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, out_dir=tmp_path,
                                          progress=False, resume=False),
                        reg_weight=1.0, logits_weight=0.5, trainable="factors")
    set_trainable(student, cfg.trainable)
    in_opt = {}

    class Spy:
        def on_train_start(self, state):
            ids = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
            in_opt["teacher"] = any(id(p) in ids for p in teacher.parameters())
            in_opt["n"] = len(ids)

    res = fit(student, data, cfg.objective(teacher), cfg.train, callbacks=[Spy()])
    assert res.step == 2 and {"block", "logits", "reg"} <= set(res.metrics)
    assert not in_opt["teacher"] and in_opt["n"] == 3 * 8  # factors only: W1, W2, bias
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    s_after = student.state_dict()
    assert not torch.equal(s_after["blocks.0.mlp.fc1.first.weight"],
                           s_before["blocks.0.mlp.fc1.first.weight"])
    assert torch.equal(s_after["head.weight"], s_before["head.weight"])  # frozen: not a factor


def test_bad_settings_are_clear_errors():
    teacher = teacher_vit()
    with pytest.raises(TrimtuneError, match="logits_loss"):
        DistillObjective(teacher, logits_loss="l1")
    with pytest.raises(TrimtuneError, match="trainable"):
        DistillConfig(trainable="some")
    with pytest.raises(TrimtuneError, match="feature_norm='l2'.*layernorm"):
        DistillConfig(feature_norm="l2")
    with pytest.raises(TrimtuneError, match="feature_norm"):
        DistillObjective(teacher, feature_norm="batch")
    with pytest.raises(TrimtuneError, match="no factorised layer"):
        set_trainable(teacher_vit(), "factors")
    assert isinstance(factorised_layers(compress(teacher))["blocks.0.mlp.fc1"], LowRankLinear)


# ---- transformers models: features through output_hidden_states ----------------------------
def hf_vit_classifier():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5, initializer_range=0.2)).eval()  # not tiny features


def hf_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=64)).eval()


def text_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0  # padded
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_transformers_vit_full_rank_student_matches_and_low_rank_learns(x):
    teacher = hf_vit_classifier()
    student = compress(teacher, r=32, exclude=["classifier"],
                       keep_dense_if_no_saving=False).eval()
    assert len(factorised_layers(student)) == 12
    obj = DistillObjective(teacher, final_weight=1.0, logits_weight=1.0, ce_weight=1.0,
                           reg_weight=1.0)
    loss, logs = obj(student, x)  # a plain tensor is the model's pixel_values
    assert set(logs) == {"block", "final", "logits", "reg"} and loss.item() < 1e-6, logs
    _, logs = obj(student, (x, torch.tensor([0, 1, -1, 2])))
    assert "ce" in logs
    # a real compression: non-zero, and a few steps on the factors bring the features closer
    student = compress(teacher, ratio=2.0)
    set_trainable(student, "factors")
    obj = DistillObjective(teacher, ce_weight=0.0)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(15):
        loss, _ = obj(student, x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.1 and obj(student, x)[0].item() < 0.5 * first
    assert all(not p.requires_grad for p in teacher.parameters())


def test_transformers_bert_blocks_and_padding_left_out():
    teacher = hf_bert()
    student = compress(teacher, ratio=2.0).eval()
    batch = text_batch()
    calls = []
    student.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    loss, logs = DistillObjective(teacher, blocks=2, final_weight=1.0)(student, batch)
    assert calls == [1]  # one student forward
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True).hidden_states[1:]
        s = student(**batch, output_hidden_states=True)
    want = torch.stack([((a - b)[keep] ** 2).mean() for a, b in zip(s.hidden_states[-2:], t[-2:])])
    torch.testing.assert_close(logs["block"], want.mean())  # last 2 blocks, real tokens only
    t_last = teacher(**batch).last_hidden_state
    torch.testing.assert_close(logs["final"],
                               ((s.last_hidden_state - t_last)[keep] ** 2).mean())
    # padded positions do not count: changing their ids leaves the loss as it was
    batch2 = dict(batch, input_ids=batch["input_ids"].masked_fill(~keep, 3))
    _, logs2 = DistillObjective(teacher, blocks=2, final_weight=1.0)(student, batch2)
    torch.testing.assert_close(logs2["block"], logs["block"])


def test_transformers_without_head_or_mixed_libraries_are_clear_errors(x):
    teacher = hf_bert()
    student = compress(teacher, ratio=2.0)
    batch = dict(text_batch(), labels=torch.tensor([0, 1, 1]))
    with pytest.raises(TrimtuneError, match="no logits .*ce_weight=0"):
        DistillObjective(teacher)(student, batch)
    assert "ce" not in DistillObjective(teacher)(student, text_batch())[1]  # no labels: fine
    with pytest.raises(TrimtuneError, match="different libraries"):
        DistillObjective(teacher_vit())(student, text_batch())


def test_fit_distils_a_transformers_student_from_dict_batches(tmp_path):
    teacher = hf_bert()
    student = compress(teacher, ratio=2.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (8, 6), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long)}
            for i in range(8)]
    cfg = DistillConfig(train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, out_dir=tmp_path,
                                          progress=False, resume=False), trainable="factors")
    set_trainable(student, cfg.trainable)
    before = student.encoder.layer[0].intermediate.dense.first.weight.clone()
    res = fit(student, data, cfg.objective(teacher), cfg.train)
    assert res.step == 2 and "block" in res.metrics
    assert not torch.equal(student.encoder.layer[0].intermediate.dense.first.weight, before)
