"""The segmentation model: patch tokens (prefix tokens dropped) -> decode head -> per-pixel
logits; every method of the registry attaches to it, trains one step (original and compressed
backbone), merges exactly, and the model folder round-trips."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import trimtune as tt
from trimtune.heads import SegmentationModel, segmenter
from trimtune.names import METHODS
from trimtune.train.objectives import SegmentationObjective
from trimtune.tuners import registry
from trimtune.tuners.targets import select_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seg_helpers import TINY, tiny_backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (2, 32, 32), generator=g)
    y[0, :4] = 255
    return torch.randn(2, 3, 32, 32, generator=g), y


@pytest.mark.parametrize("head", ["linear", "linear4"])
def test_shapes_and_patch_tokens(head):
    bb = tiny_backbone(num_classes=7)
    m = segmenter(bb, 3, head=head, seed=0)
    assert bb.num_classes == 0 and bb.trimtune_arch["kwargs"]["num_classes"] == 0
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 3, 32, 32)
    feats = m.forward_features(x)
    assert len(feats) == (1 if head == "linear" else 2)  # linear4 on 2 blocks: both
    with torch.no_grad():  # the last map = the final-normed patch tokens of forward_features
        tokens = bb.forward_features(x)[:, bb.num_prefix_tokens:]
    torch.testing.assert_close(feats[-1].flatten(2).transpose(1, 2), tokens)


def test_register_tokens_are_dropped():
    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                           reg_tokens=4, **TINY)
    m = SegmentationModel(bb, 3)
    assert bb.num_prefix_tokens == 5
    assert m.forward_features(torch.randn(1, 3, 32, 32))[0].shape == (1, 64, 4, 4)


def test_bad_arguments():
    with pytest.raises(tt.TrimtuneError, match="unknown segmentation head"):
        SegmentationModel(tiny_backbone(), 3, head="upernet")
    with pytest.raises(tt.TrimtuneError, match="2 classes or more"):
        SegmentationModel(tiny_backbone(), 1)


def _compressed_backbone():
    return tt.compress(tiny_backbone(), ratio=2.0)


def _attach(model, method):
    if method in ("snella", "snell"):
        cls = tt.SnellaConfig if method == "snella" else tt.SnellConfig
        return registry.attach(model, cls(r=4))
    return registry.attach(model, method, rank=4)


@pytest.mark.parametrize("compressed", [False, True], ids=["original", "compressed"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_step_and_merges(method, compressed):
    bb = _compressed_backbone() if compressed else tiny_backbone()
    m = segmenter(bb, 3, seed=0)
    targets = select_linears(m, None, modules_to_save=["head"], warn=False)
    assert "backbone.blocks.0.attn.qkv" + (".second" if compressed else "") in targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _attach(m, method)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    head = {n for n in trainable if n.startswith("head.")}
    assert any(n.endswith("conv.weight") for n in head), (method, sorted(trainable)[:5])
    if method == "linear":
        assert trainable == head
    else:
        assert trainable - head, f"{method} trains nothing in the backbone"
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    loss, logs = SegmentationObjective()(m, _batch())
    assert torch.isfinite(loss) and 0 <= float(logs["train_pixel_acc"]) <= 1
    loss.backward()
    opt.step()
    moved = [n for n, p in m.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.startswith("head.") for n in moved)
    if method not in ("linear",):
        assert any(not n.startswith("head.") for n in moved), method
    # merge == unmerged predictions
    m.eval()
    x = _batch()[0]
    with torch.no_grad():
        y = m(x)
        plain = tt.merge(m)
        assert isinstance(plain, SegmentationModel) and registry.method_of(plain) is None
        torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compressed", [False, True], ids=["original", "compressed"])
def test_model_folder_round_trip(tmp_path, compressed):
    bb = _compressed_backbone() if compressed else tiny_backbone()
    m = segmenter(bb, 3, head="linear4", seed=0).eval()
    with torch.no_grad():
        m.head.bn.running_mean.uniform_()  # buffers travel too
    folder = tt.save_model(m, tmp_path / "seg")
    back = tt.load_model(str(folder))
    assert isinstance(back, SegmentationModel) and back.head_kind == "linear4"
    assert tt.is_compressed(back) == compressed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), m(x))
    if compressed:
        assert set(back.trimtune_lowrank["ranks"]) == set(m.trimtune_lowrank["ranks"])
        assert all(k.startswith("backbone.") for k in back.trimtune_lowrank["ranks"])
