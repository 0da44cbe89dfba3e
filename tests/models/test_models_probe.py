"""Every architecture, every replacing verb: the replaced layers are on the forward path, or a
clear error says which is not (trimtune.models.probe)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from trimtune.errors import TrimtuneError
from trimtune.lowrank import compress, factorised_layers, load_compressed, save_compressed
from trimtune.lowrank.distill import DistillObjective
from trimtune.models.probe import check_forward_path, example_input
from trimtune.tuners import SnellaConfig, attach, iter_snell_layers, merge, prepare_method

TINY = dict(depth=2, embed_dim=64, num_heads=2, num_classes=5)
TIMM_TARGETS = "fc1|fc2|qkv|proj"


def timm_model(arch, **kwargs):
    def build():
        model = timm.create_model(arch, pretrained=False, **kwargs)
        model.trimtune_arch = {"arch": arch, "kwargs": kwargs}  # as create_backbone records
        return model
    return build


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, num_labels=5))


def hf_bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=128))


HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **HF_TINY))


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, num_key_value_heads=1, **HF_TINY))


def hf_qwen2():  # tied input / output embeddings, q/k/v biases
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=100, num_key_value_heads=1,
                                        tie_word_embeddings=True, **HF_TINY))


DECODER = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


# name, builder, target pattern, head (trained in full), the documented error (None: it must
# work). EVA's F.linear(x, qkv.weight) is switched to timm's own qkv(x) + bias path first.
ARCHS = [
    ("vit", timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, **TINY),
     TIMM_TARGETS, "head", None),
    ("deit", timm_model("deit_tiny_patch16_224", img_size=32, patch_size=8, **TINY),
     TIMM_TARGETS, "head", None),
    ("eva02", timm_model("eva02_tiny_patch14_224", img_size=28, **TINY),
     TIMM_TARGETS, "head", None),
    ("vit_reg", timm_model("vit_small_patch14_reg4_dinov2", img_size=28, **TINY),
     TIMM_TARGETS, "head", None),
    ("swin", timm_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1),
                        num_heads=(1, 2), window_size=4, img_size=32, patch_size=2,
                        num_classes=5), TIMM_TARGETS, "head", None),
    ("convnext", timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                            conv_mlp=False, num_classes=5), TIMM_TARGETS, "head", None),
    # timm's convnext_atto default: 1x1 convolutions, no nn.Linear to adapt or factorise
    ("convnext_conv_mlp", timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                     num_classes=5), TIMM_TARGETS, "head",
     "match no nn.Linear|no linear layer"),
    # transformers models: the probe feeds pixel_values / input_ids built from their config
    ("hf_vit", hf_vit, "q_proj|k_proj|v_proj|o_proj|fc1|fc2", "classifier", None),
    ("hf_bert", hf_bert, "query|key|value|dense", None, None),
    ("hf_clip_vision", hf_clip_vision, "q_proj|k_proj|v_proj|out_proj|fc1|fc2", None, None),
    ("hf_llama", hf_llama, DECODER, None, None),
    ("hf_qwen2", hf_qwen2, DECODER, None, None),
]


def adapt(model, how, targets, head):
    keep = [head] if head else []
    if how == "snella":
        return attach(model, SnellaConfig(r=4, target_modules=f"(.*\\.)?({targets})",
                                          modules_to_save=keep))
    return prepare_method(model, "lora", rank=4, target_modules=f"(.*\\.)?({targets})",
                          modules_to_save=keep)[0]


def first(out):
    """The first output tensor (timm: the logits; transformers: logits / last_hidden_state)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def call(model, x):
    return first(model(**x) if isinstance(x, dict) else model(x))


def loss_of(model, x):
    """A loss on every output tensor (transformers: last_hidden_state and pooler_output...)."""
    out = model(**x) if isinstance(x, dict) else model(x)
    outs = [out] if isinstance(out, torch.Tensor) else [
        v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor)]
    return sum(o.float().pow(2).mean() for o in outs)


@pytest.mark.parametrize("how", ["snella", "lora", "compress"])
@pytest.mark.parametrize("name,builder,targets,head,error", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_architecture_replaced_layers_train_and_merge(name, builder, targets, head, error,
                                                            how, one_thread, tmp_path):
    torch.manual_seed(0)
    model = builder()
    if error:
        with pytest.raises(TrimtuneError, match=error):
            compress(model, ratio=2.0) if how == "compress" else adapt(model, how, targets, head)
        return
    x = example_input(model, batch_size=2)
    if how == "compress":
        small = compress(model, ratio=2.0)  # the probe ran inside: every factor is used
        assert factorised_layers(small)
        small.train()
        loss_of(small, x).backward()
        assert all(p.grad is not None for m in factorised_layers(small).values()
                   for p in m.parameters())
        # distil one step from the original (timm: forward_intermediates; transformers:
        # output_hidden_states), then save / load exactly
        small.zero_grad()
        loss, logs = DistillObjective(model, ce_weight=0.0)(small, x)
        loss.backward()
        assert torch.isfinite(loss) and logs["block"] > 0
        small.eval()
        back = load_compressed(save_compressed(small, tmp_path / name))
        with torch.no_grad():
            assert torch.equal(call(back, x), call(small, x))
        return
    model = adapt(model, how, targets, head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss_of(model, x).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable
    adapter = {k for k in changed if "snell_" in k or "lora_" in k}
    assert adapter, f"{name}/{how}: no adapter parameter moved"
    model.eval()
    with torch.no_grad():
        out = call(model, x)
        merged = merge(model)  # the one merge, any method
        torch.testing.assert_close(call(merged, x), out, atol=1e-4, rtol=1e-4)


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
        attach(model, SnellaConfig(r=2, target_modules=["fc"]), probe=x)
    assert isinstance(model.fc, nn.Linear) and not hasattr(model, "trimtune_adapter")
    with pytest.raises(TrimtuneError, match=r"never called.*'fc'"):
        prepare_method(model, "lora", rank=2, target_modules=["fc"], modules_to_save=["out"],
                       probe=x)
    assert isinstance(model.fc, nn.Linear) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TrimtuneError, match="probe forward .* failed.*AttributeError"):
        compress(model, r=2, include="fc", probe=x)
    attach(model, SnellaConfig(r=2, target_modules=["fc"]), probe=False)  # the user's call


def test_eva_without_the_switch_is_caught():
    torch.manual_seed(0)
    model = adapt(ARCHS[2][1](), "snella", TIMM_TARGETS, "head")
    for blk in model.blocks:
        blk.attn.qkv_bias_separate = False  # timm's default path: F.linear(x, qkv.weight)
    with pytest.raises(TrimtuneError, match=r"blocks\.0\.attn\.qkv"):
        check_forward_path(model, [n for n, _ in iter_snell_layers(model)])


def test_detached_output_is_caught():
    class Detaches(ReadsWeight):
        def forward(self, x):
            return self.out(self.fc(x).detach())

    model = Detaches()
    with pytest.raises(TrimtuneError, match="no gradient"):
        attach(model, SnellaConfig(r=2, target_modules=["fc"]), probe=torch.randn(2, 16))


def test_no_input_can_be_built_warns_once():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="cannot build an example input"):
        attach(model, SnellaConfig(r=2, target_modules=["0"]))


def test_probe_restores_mixed_training_modes_and_leaves_no_grad():
    torch.manual_seed(0)
    model = ARCHS[0][1]().train()
    model.blocks[0].eval()
    attach(model, SnellaConfig(r=2))
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(p.grad is None for p in model.parameters())
