"""Image transforms from a model's timm data config, for the VTAB and FGVC protocols."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from ..errors import TrimtuneError

PROTOCOLS = ("vtab", "fgvc")
_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS,
                  "box": T.InterpolationMode.BOX, "hamming": T.InterpolationMode.HAMMING}


def data_config(model_or_cfg: nn.Module | Mapping[str, Any] | int) -> dict[str, Any]:
    """timm data config (input_size, mean, std, interpolation, crop_pct) of a model or dict.

    A dict may give ``input_size`` (C, H, W) or ``img_size``, and any of ``mean``, ``std``,
    ``interpolation``, ``crop_pct``; missing keys take timm's defaults. An int is an image size.

    For a model, timm's ``pretrained_cfg`` gives mean / std / interpolation; the input size is
    the one the model was built for (``patch_embed.img_size`` of a ViT created with
    ``img_size=...``), since timm leaves ``pretrained_cfg["input_size"]`` at the original size.
    """
    if isinstance(model_or_cfg, nn.Module):
        cfg = resolve_data_config(model=model_or_cfg)
        built = getattr(getattr(model_or_cfg, "patch_embed", None), "img_size", None)
        if isinstance(built, (tuple, list)) and len(built) == 2 and all(built):
            cfg["input_size"] = (cfg["input_size"][0], int(built[0]), int(built[1]))
        return cfg
    if isinstance(model_or_cfg, int):
        model_or_cfg = {"img_size": model_or_cfg}
    if not isinstance(model_or_cfg, Mapping):
        raise TrimtuneError(f"build_transform needs a model or a data-config dict, got "
                            f"{type(model_or_cfg).__name__}: pass the model itself or "
                            "timm.data.resolve_data_config(model=model)")
    return resolve_data_config(args=dict(model_or_cfg) or {"img_size": 224})


def build_transform(model_or_cfg: nn.Module | Mapping[str, Any] | int, train: bool = False,
                    protocol: str = "vtab") -> T.Compose:
    """PIL RGB image -> normalised (3, H, W) float tensor, for ``model_or_cfg``'s input size.

    Protocols (as in the SNELL / NOAH / VPT papers):

    * ``"vtab"``: resize to (H, W) (no crop, no augmentation), ToTensor, Normalize; the same
      for training and evaluation.
    * ``"fgvc"``: training = RandomResizedCrop(H, W) + horizontal flip; evaluation = resize
      to H / crop_pct + center crop (timm ``create_transform``); then ToTensor, Normalize.
    """
    if protocol not in PROTOCOLS:
        raise TrimtuneError(f"unknown transform protocol {protocol!r}: use one of "
                            f"{', '.join(PROTOCOLS)}")
    cfg = data_config(model_or_cfg)
    size = tuple(cfg["input_size"][-2:])
    interpolation = cfg.get("interpolation", "bicubic")
    if protocol == "vtab":
        mode = _INTERPOLATION.get(interpolation, T.InterpolationMode.BICUBIC)
        return T.Compose([
            T.Resize(size, interpolation=mode),
            T.ToTensor(),
            T.Normalize(mean=cfg["mean"], std=cfg["std"]),
        ])
    if train:
        return create_transform(size, is_training=True, color_jitter=None,
                                interpolation=interpolation, mean=cfg["mean"], std=cfg["std"])
    return create_transform(size, is_training=False, interpolation=interpolation,
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg.get("crop_pct"),
                            crop_mode=cfg.get("crop_mode"))
