"""Semantic segmentation on a ViT backbone: decode heads on patch tokens and the model that
joins them.

:class:`SegmentationModel` keeps the backbone as a submodule named ``backbone`` and the decode
head as ``head``, so every name-based rule still sees the backbone's layers
(``backbone.blocks.3.attn.qkv`` matches the default target pattern of every method) and the
decode head is what every method trains in full (``modules_to_save = ["head"]``).

Heads (DINOv2's linear evaluation heads, ``BNHead`` in its segmentation configs):

===========  =====================================================================================
``linear``   the last block's patch tokens (final norm applied): BatchNorm + 1x1 conv
``linear4``  the last 4 blocks' patch tokens, each normed, concatenated on channels: BatchNorm +
             1x1 conv (a light multi-level head)
===========  =====================================================================================

Logits are computed at patch resolution and upsampled bilinearly to the input size. Patch
tokens come from timm's ``forward_intermediates`` (prefix tokens, i.e. class and register
tokens, dropped by timm), or ``forward_features`` minus ``num_prefix_tokens`` for models
without it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrimtuneError
from ..models import arch_of, build_from_arch
from ..names import SEG_HEADS

#: the architecture name of a segmentation model in ``trimtune_arch`` records
SEGMENTER = "trimtune.segmenter"
#: decode head -> number of last blocks whose patch tokens it reads
HEADS = dict(zip(SEG_HEADS, (1, 4)))
IGNORE_INDEX = 255


class LinearDecodeHead(nn.Module):
    """DINOv2's linear head: ``BatchNorm2d(C) -> Conv2d(C, K, 1)`` on patch-token maps.

    Args:
        in_channels: C, the channels of the concatenated feature maps.
        num_classes: K.

    Shapes: a list of (B, C_i, h, w) maps with sum C_i = C -> (B, K, h, w) logits.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # as mmseg's BaseDecodeHead
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
        return self.conv(self.bn(x))


def patch_maps(backbone: nn.Module, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The last ``levels`` blocks' patch tokens of ``backbone`` on ``x`` (B, 3, H, W), each as a
    normed (B, C, H / p, W / p) map (prefix tokens dropped)."""
    if hasattr(backbone, "forward_intermediates"):
        return list(backbone.forward_intermediates(x, indices=levels, norm=True,
                                                   output_fmt="NCHW", intermediates_only=True))
    if levels != 1:
        raise TrimtuneError(f"{type(backbone).__name__} has no forward_intermediates: use the "
                            "'linear' head (last block only)")
    tokens = backbone.forward_features(x)
    tokens = tokens[:, getattr(backbone, "num_prefix_tokens", 1):]
    h, w = backbone.patch_embed.grid_size
    return [tokens.transpose(1, 2).reshape(len(x), -1, h, w)]


class SegmentationModel(nn.Module):
    """A backbone's patch tokens -> decode head -> per-pixel logits.

    Args:
        backbone: a timm ViT-like model (original or compressed); its classifier is removed
            (``reset_classifier(0)``), in place.
        num_classes: K, the segmentation classes (the ignore index 255 is not one).
        head: ``"linear"`` or ``"linear4"`` (see the module docstring).

    Shapes: (B, 3, H, W) images -> (B, K, H, W) logits.

    The backbone's data config (``pretrained_cfg``, ``patch_embed``) is visible on the model, so
    transforms, forward-path probes and input sizes work as on the backbone itself.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        if head not in HEADS:
            raise TrimtuneError(f"unknown segmentation head {head!r}: use one of "
                                f"{', '.join(HEADS)}")
        if int(num_classes) < 2:
            raise TrimtuneError(f"a segmentation model needs 2 classes or more, got "
                                f"{num_classes} (background counts as one)")
        if isinstance(backbone, SegmentationModel):
            raise TrimtuneError("the backbone is already a SegmentationModel: pass its "
                                ".backbone, or use it as it is")
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)  # features only: the classifier would never train
            rec = getattr(backbone, "trimtune_arch", None)
            if isinstance(rec, dict) and isinstance(rec.get("kwargs"), dict):
                rec["kwargs"]["num_classes"] = 0
        width = getattr(backbone, "embed_dim", None) or getattr(backbone, "num_features", None)
        if not width:
            raise TrimtuneError(f"{type(backbone).__name__} has no embed_dim / num_features: "
                                "segmentation needs a timm ViT-like backbone")
        self.backbone = backbone
        self.head_kind = head
        depth = len(getattr(backbone, "blocks", None) or ()) or HEADS[head]
        self.levels = min(HEADS[head], depth)  # linear4 on a 2-block model: both blocks
        self.num_classes = int(num_classes)
        self.head = LinearDecodeHead(int(width) * self.levels, self.num_classes)

    # ---- what the backbone's users read (transforms, probes, input size) -------------------
    @property
    def patch_embed(self) -> nn.Module:
        return self.backbone.patch_embed

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.backbone, "pretrained_cfg", None) or {}

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @property
    def trimtune_arch(self) -> dict:
        """``{"arch": SEGMENTER, "kwargs": {num_classes, head}, "backbone": <its record>}``."""
        return {"arch": SEGMENTER, "kwargs": {"num_classes": self.num_classes,
                                              "head": self.head_kind},
                "backbone": arch_of(self.backbone)}

    @trimtune_arch.setter
    def trimtune_arch(self, record: dict) -> None:  # load_compressed sets it after a build
        if isinstance(record, dict) and isinstance(record.get("backbone"), dict):
            self.backbone.trimtune_arch = copy.deepcopy(record["backbone"])

    @property
    def trimtune_lowrank(self) -> dict | None:
        """The backbone's compression record, layer names prefixed with ``backbone.``."""
        rec = getattr(self.backbone, "trimtune_lowrank", None)
        if rec is None:
            return None
        out = copy.deepcopy(rec)
        for key in ("ranks", "kept_dense", "energy"):
            if isinstance(out.get(key), dict):
                out[key] = {f"backbone.{k}": v for k, v in out[key].items()}
        return out

    @trimtune_lowrank.setter
    def trimtune_lowrank(self, record: dict) -> None:  # load_compressed sets it after a build
        out = copy.deepcopy(record)
        for key in ("ranks", "kept_dense", "energy"):
            if isinstance(out.get(key), dict):
                out[key] = {k.removeprefix("backbone."): v for k, v in out[key].items()}
        self.backbone.trimtune_lowrank = out

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh decode head for ``num_classes`` classes."""
        ref = self.head.conv
        self.num_classes = int(num_classes)
        self.head = LinearDecodeHead(ref.in_channels, self.num_classes).to(ref.weight.device)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in (nwd() if callable(nwd) else ())}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the patch-token maps the head reads."""
        return patch_maps(self.backbone, x, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.forward_features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmenter(backbone: nn.Module, num_classes: int, head: str = "linear",
              seed: int | None = None) -> SegmentationModel:
    """``backbone`` (a model or a timm / zoo name) as a :class:`SegmentationModel` with a fresh
    decode head; ``seed`` seeds torch first (the head's init). A SegmentationModel is returned
    as it is (its head replaced when ``num_classes`` differs)."""
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(backbone, str):
        from ..models import create_backbone
        backbone = create_backbone(backbone, num_classes=0)
    if isinstance(backbone, SegmentationModel):
        if backbone.num_classes != num_classes:
            backbone.reset_classifier(num_classes)
        return backbone
    return SegmentationModel(backbone, num_classes, head=head)


def build_segmenter(arch: dict[str, Any]) -> SegmentationModel:
    """Rebuild a segmentation model from its ``trimtune_arch`` record (random weights)."""
    kw = dict(arch.get("kwargs") or {})
    if not isinstance(arch.get("backbone"), dict) or "num_classes" not in kw:
        raise TrimtuneError(f"segmentation model record {arch!r} lacks its backbone or "
                            "num_classes: re-save the model with this trimtune version")
    backbone = build_from_arch(arch["backbone"])
    return SegmentationModel(backbone, int(kw["num_classes"]), head=kw.get("head", "linear"))


def is_segmenter(model: Any) -> bool:
    return isinstance(model, SegmentationModel)


__all__ = ["HEADS", "IGNORE_INDEX", "LinearDecodeHead", "SEGMENTER", "SegmentationModel",
           "build_segmenter", "is_segmenter", "patch_maps", "segmenter"]
