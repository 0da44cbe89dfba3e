"""Shared fixtures: tiny random timm models keep the suite fast on 2 CPU cores."""

import os

import pytest
import timm
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the compiled SNELL path (trimtune.tuners.snell.compiled, default "auto": large CPU units)
# compiles for tens of seconds on its first call; the suite tests it explicitly (tests/tuners/
# test_tuners_compiled.py sets TRIMTUNE_COMPILE itself) and runs everything else eager
os.environ.setdefault("TRIMTUNE_COMPILE", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: THE tiny model of the suite (timm kwargs): a 2-block ViT on 32 px images, fused qkv like every
#: timm ViT. Test files import it (``from conftest import TINY, tiny_backbone``) and never
#: redefine it; a test that needs another size overrides one key (``tiny_vit(depth=3)``).
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
ARCH = "vit_tiny_patch16_224"


def tiny_vit(num_classes: int = 5, **kw) -> torch.nn.Module:
    """The tiny ViT built by timm itself (seed 0)."""
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **{**TINY, **kw})


def tiny_backbone(num_classes: int = 4, *, seed: int = 0, **kw) -> torch.nn.Module:
    """The tiny ViT built by ``trimtune.create_backbone`` (it records ``trimtune_arch``, so
    ``save_model`` / ``load_model`` round-trip it); seeded."""
    import trimtune as tt
    torch.manual_seed(seed)
    return tt.create_backbone(ARCH, pretrained=False, num_classes=num_classes, **{**TINY, **kw})


def move_off_init(model: torch.nn.Module, scale: float = 0.05, seed: int = 1
                  ) -> torch.nn.Module:
    """Stand-in for training: every trainable tensor moves by ``scale`` x N(0, 1) noise from its
    own generator (the global RNG is left alone); returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (2 threads on a shared 2-core box spin-wait)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny random Hugging Face transformers models (configs only: nothing is downloaded) ----
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def hf_vit(num_labels: int = 5):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=num_labels,
                                               **HF_TINY))


def hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **HF_TINY))


def hf_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, **HF_TINY))


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, num_key_value_heads=1, **HF_TINY))


def hf_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=100, num_key_value_heads=1, **HF_TINY))
