"""Adapter save / load in Hugging Face PEFT's layout.

A folder with ``adapter_config.json`` (method, kernel, rank, per-unit sparsity, targets, the
base it belongs to) and ``adapter_model.safetensors`` (``snell_A`` / ``snell_B`` / kernel
tensors of every unit, plus the fully trained ``modules_to_save`` and tokens, under their
qualified names in the adapted model). Both writes are atomic.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_json, read_safetensors, write_json, write_safetensors
from ..errors import TrimtuneError
from .config import config_from_dict
from .inject import attach, iter_units

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def base_arch(model: nn.Module) -> str | None:
    """The base architecture name: ``model.trimtune_arch["arch"]`` or timm's pretrained_cfg."""
    arch = getattr(model, "trimtune_arch", None)
    if isinstance(arch, dict) and arch.get("arch"):
        return str(arch["arch"])
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return None


def base_fingerprint(model: nn.Module, targets: list[str]) -> dict[str, Any]:
    """Shapes (out, in) of the targeted weights and the base's parameter count.

    Works before and after :func:`~trimtune.tuners.attach` (adapter parameters and the
    wrappers are left out).
    """
    shapes = {}
    for name in targets:
        mod = model.get_submodule(name)
        w = mod.weight  # nn.Linear or SnellLinear (forwards .weight to its base)
        shapes[name] = list(w.shape)
    n = sum(p.numel() for k, p in model.named_parameters() if ".snell_units." not in k)
    return {"target_shapes": shapes, "num_params": n}


def _adapter_state(model: nn.Module, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{m}." for m in info["modules_to_save"])
    tokens = set(info["tokens"])
    return {k: v for k, v in model.state_dict().items()
            if ".snell_units." in k or k.startswith(prefixes) or k in tokens}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter of ``model`` to the folder ``path`` (created if needed).

    Returns:
        the folder.

    Raises:
        TrimtuneError: the model has no SNELL/SNELLA adapter attached.
    """
    info = getattr(model, "trimtune_adapter", None)
    if not info or "config" not in info or info.get("method") not in ("snell", "snella"):
        raise TrimtuneError("model has no SNELL/SNELLA adapter to save: attach one with "
                            "trimtune.tuners.attach (a merged model is saved as a whole model)")
    path = Path(path)
    cfg = info["config"]
    from .. import __version__

    meta = {
        "format_version": FORMAT_VERSION, "trimtune_version": __version__,
        "peft_type": info["method"].upper(), "method": info["method"],
        "kernel": cfg.kernel, "rank": cfg.rank, "config": cfg.to_dict(),
        "targets": info["targets"], "modules_to_save": info["modules_to_save"],
        "tokens": info["tokens"],
        "sparsity": {name: u.sparsity for name, u in iter_units(model)},
        "base": {"arch": base_arch(model), **base_fingerprint(model, info["targets"])},
    }
    write_safetensors(path / WEIGHTS_NAME, _adapter_state(model, info),
                      metadata={"format": "pt", "method": info["method"]})
    write_json(path / CONFIG_NAME, meta)
    return path


def _check_base(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    base = meta["base"]
    arch = base_arch(model)
    if base.get("arch") and arch and base["arch"] != arch:
        raise TrimtuneError(f"adapter {path} was trained on a {base['arch']} base, this model is "
                            f"a {arch}: load it onto a {base['arch']} model")
    for name, shape in base["target_shapes"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear) or list(mod.weight.shape) != shape:
            got = list(mod.weight.shape) if isinstance(mod, nn.Linear) else "missing"
            raise TrimtuneError(f"adapter {path} targets {name} with weight {shape}, this model "
                                f"has {got}: load it onto the same base ({base.get('arch')}, "
                                "same compression) it was trained on")
    n = sum(p.numel() for p in model.parameters())
    if n != base["num_params"]:
        raise TrimtuneError(f"adapter {path} belongs to a base with {base['num_params']:,} "
                            f"parameters, this model has {n:,}: load it onto the same base "
                            "(architecture, num_classes, compression)")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved in ``path`` to ``model`` (in place) and load its tensors.

    Returns:
        ``model``, adapted, with each unit's saved sparsity.

    Raises:
        TrimtuneError: missing / damaged files, a base of another architecture or shape, or a
            model that already has an adapter.
    """
    path = Path(path)
    meta = read_json(path / CONFIG_NAME)
    if meta.get("method") not in ("snell", "snella"):
        raise TrimtuneError(f"{path / CONFIG_NAME} is not a SNELL/SNELLA adapter (method "
                            f"{meta.get('method')!r}): load it with the tool that wrote it")
    tensors = read_safetensors(path / WEIGHTS_NAME)
    if getattr(model, "trimtune_adapter", None) is not None:
        raise TrimtuneError("this model already has an adapter attached: load onto a fresh base"
                            " or call trimtune.tuners.detach(model) first")
    _check_base(model, meta, path)
    cfg_dict = dict(meta["config"])
    cfg_dict["target_modules"] = [re.escape(t) for t in meta["targets"]]
    cfg = config_from_dict(cfg_dict)
    attach(model, cfg)
    model.trimtune_adapter["config"] = config_from_dict(meta["config"])  # user's own patterns
    state = model.state_dict()
    missing = sorted(set(tensors) - set(state))
    if missing:
        raise TrimtuneError(f"adapter {path} holds tensors this model lacks ({missing[:3]}...): "
                            "load it onto the base it was trained on")
    expected = set(_adapter_state(model, model.trimtune_adapter))
    absent = sorted(expected - set(tensors))
    if absent:
        raise TrimtuneError(f"adapter {path} lacks tensors {absent[:3]}...: the file is damaged "
                            "or incomplete; save the adapter again")
    model.load_state_dict(tensors, strict=False)
    units = dict(iter_units(model))
    for name, s in meta["sparsity"].items():
        units[name].sparsity = s
    return model
