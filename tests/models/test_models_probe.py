"""Every architecture, every replacing verb: the replaced layers are on the forward path, or a
clear error says which is not (trimtune.models.probe)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.lowrank import compress, factorised_layers
from trimtune.models.probe import check_forward_path, example_input
from trimtune.tuners import SnellaConfig, attach, merge, prepare_method
from trimtune.tuners.baselines import merge_method

TINY = dict(depth=2, embed_dim=64, num_heads=2, num_classes=5)
# name, timm model, kwargs, the documented error (None: it must work). EVA's
# F.linear(x, qkv.weight) is switched to timm's own qkv(x) + bias path before wrapping.
ARCHS = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, **TINY), None),
    ("deit", "deit_tiny_patch16_224", dict(img_size=32, patch_size=8, **TINY), None),
    ("eva02", "eva02_tiny_patch14_224", dict(img_size=28, **TINY), None),
    ("vit_reg", "vit_small_patch14_reg4_dinov2", dict(img_size=28, **TINY), None),
    ("swin", "swin_tiny_patch4_window7_224", dict(
        embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=32,
        patch_size=2, num_classes=5), None),
    ("convnext", "convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                       conv_mlp=False, num_classes=5), None),
    # timm's convnext_atto default: 1x1 convolutions, no nn.Linear to adapt or factorise
    ("convnext_conv_mlp", "convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                                num_classes=5),
     "match no nn.Linear|no linear layer"),
]


def build(arch, kwargs):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kwargs)


def adapt(model, how):
    if how == "snella":
        return attach(model, SnellaConfig(rank=4, target_modules="fc1|fc2|qkv|proj"))
    return prepare_method(model, "lora", rank=4, target_modules="(.*\\.)?(fc1|fc2|qkv|proj)")[0]


@pytest.mark.parametrize("how", ["snella", "lora", "compress"])
@pytest.mark.parametrize("name,arch,kwargs,error", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_architecture_replaced_layers_train_and_merge(name, arch, kwargs, error, how,
                                                            one_thread):
    model = build(arch, kwargs)
    if error:
        with pytest.raises(TrimtuneError, match=error):
            compress(model, ratio=2.0) if how == "compress" else adapt(model, how)
        return
    x = example_input(model, batch_size=2)
    y = torch.tensor([0, 3])
    if how == "compress":
        small = compress(model, ratio=2.0)  # the probe ran inside: every factor is used
        assert factorised_layers(small)
        small.train()
        F.cross_entropy(small(x), y).backward()
        assert all(p.grad is not None for m in factorised_layers(small).values()
                   for p in m.parameters())
        return
    model = adapt(model, how)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable
    adapter = {k for k in changed if "snell_" in k or "lora_" in k}
    assert adapter, f"{name}/{how}: no adapter parameter moved"
    model.eval()
    with torch.no_grad():
        out = model(x)
        merged = merge(model) if how == "snella" else merge_method(model, "lora")
        torch.testing.assert_close(merged(x), out, atol=1e-4, rtol=1e-4)


class ReadsWeight(nn.Module):
    """Reads its linear's weight with F.linear instead of calling it (EVA's old pattern)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.linear(x, self.fc.weight, self.fc.bias))


def test_layer_read_by_weight_is_refused_and_model_left_as_it_was():
    model = ReadsWeight()
    x = torch.randn(2, 16)
    with pytest.raises(TrimtuneError, match=r"never called.*'fc'"):
        attach(model, SnellaConfig(rank=2, target_modules="fc"), probe=x)
    assert isinstance(model.fc, nn.Linear) and not hasattr(model, "trimtune_adapter")
    with pytest.raises(TrimtuneError, match=r"never called.*'fc'"):
        prepare_method(model, "lora", rank=2, target_modules=["fc"], modules_to_save=["out"],
                       probe=x)
    assert isinstance(model.fc, nn.Linear) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TrimtuneError, match="probe forward .* failed.*AttributeError"):
        compress(model, rank=2, include="fc", probe=x)
    attach(model, SnellaConfig(rank=2, target_modules="fc"), probe=False)  # the user's call


def test_eva_without_the_switch_is_caught():
    model = adapt(build("eva02_tiny_patch14_224", dict(img_size=28, **TINY)), "snella")
    for blk in model.blocks:
        blk.attn.qkv_bias_separate = False  # timm's default path: F.linear(x, qkv.weight)
    with pytest.raises(TrimtuneError, match=r"blocks\.0\.attn\.qkv"):
        check_forward_path(model, model.trimtune_adapter["targets"])


def test_detached_output_is_caught():
    class Detaches(ReadsWeight):
        def forward(self, x):
            return self.out(self.fc(x).detach())

    model = Detaches()
    with pytest.raises(TrimtuneError, match="no gradient"):
        attach(model, SnellaConfig(rank=2, target_modules="fc"), probe=torch.randn(2, 16))


def test_no_input_can_be_built_warns_once():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="cannot build an example input"):
        attach(model, SnellaConfig(rank=2, target_modules="0"))
