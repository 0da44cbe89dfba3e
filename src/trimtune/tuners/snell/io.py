"""Adapter save / load in Hugging Face PEFT's format, readable by PEFT itself.

A folder with ``adapter_config.json`` (the config's ``to_dict()``, exactly what
``PeftConfig.save_pretrained`` writes: ``peft_type``, ``r``, ``target_modules`` ...) and
``adapter_model.safetensors`` (the adapter state under PEFT's keys,
``base_model.model.<module>.snell_units.<i>.snell_A``; per-unit sparsities are the ``zeroed``
buffers). The safetensors header also records the base the adapter belongs to (architecture,
target weight shapes, parameter count), so loading onto another base is a clear error, while
``peft.PeftModel.from_pretrained(model, folder)`` opens the same folder. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from ...checkpoint import read_json, read_safetensors
from ...errors import TrimtuneError
from ..peft_folder import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, write_peft_folder
from .config import SnellConfig, config_from_dict
from .attach import adapter_configs, attach, iter_snell_layers

FORMAT_VERSION = 2


def base_arch(model: nn.Module) -> str | None:
    """The base architecture name: ``model.trimtune_arch["arch"]``, timm's pretrained_cfg or a
    transformers config's ``model_type``."""
    arch = getattr(model, "trimtune_arch", None)
    if isinstance(arch, dict) and arch.get("arch"):
        return str(arch["arch"])
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return str(mt) if mt else None


def _adapter_numel(model: nn.Module) -> int:
    """Entries that an adapter added (its tensors and modules-to-save copies)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if ".snell_units." in n or ".modules_to_save." in n)


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"arch", "target_shapes": {layer: [out, in]}, "num_params"}`` of the base under an
    attached SNELL adapter (adapter tensors and modules-to-save copies left out)."""
    shapes = {n: list(layer.get_base_layer().weight.shape) for n, layer in
              iter_snell_layers(model)}
    n = sum(p.numel() for p in model.parameters()) - _adapter_numel(model)
    return {"arch": base_arch(model), "target_shapes": shapes, "num_params": n}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
                 ) -> Path:
    """Write adapter ``adapter_name`` of ``model`` (plain model or ``PeftModel``) to ``path``.

    Raises:
        TrimtuneError: the model has no SNELL/SNELLA adapter of that name.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    configs = adapter_configs(base) or adapter_configs(model)
    cfg = configs.get(adapter_name)
    if not isinstance(cfg, SnellConfig):
        have = ", ".join(f"{k!r} ({getattr(v, 'peft_type', '?')})" for k, v in configs.items())
        raise TrimtuneError(f"model has no SNELL/SNELLA adapter {adapter_name!r} to save (it has: "
                            f"{have or 'none'}): attach one with trimtune.attach (a merged model "
                            "is saved as a whole model)")
    path = Path(path)
    state = get_peft_model_state_dict(base, adapter_name=adapter_name,
                                      save_embedding_layers=False)
    from ... import __version__

    meta = {"format": "pt", "trimtune_version": __version__,
            "trimtune_format": str(FORMAT_VERSION),
            "trimtune_base": json.dumps(base_fingerprint(base), sort_keys=True)}
    return write_peft_folder(path, state, cfg, meta)


def _read_base(path: Path) -> dict[str, Any] | None:
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["trimtune_base"]) if "trimtune_base" in meta else None


def _check_base(model: nn.Module, base: dict[str, Any] | None, path: Path) -> None:
    if base is None:  # written by PEFT itself: PEFT's own key / shape checks apply
        return
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
            got = list(mod.weight.shape) if isinstance(mod, nn.Linear) else "no such linear"
            raise TrimtuneError(f"adapter {path} targets {name} with weight {shape}, this model "
                                f"has {got}: load it onto the same base ({base.get('arch')}, "
                                "same compression) it was trained on")
    n = sum(p.numel() for p in model.parameters())
    if n != base["num_params"]:
        raise TrimtuneError(f"adapter {path} belongs to a base with {base['num_params']:,} "
                            f"parameters, this model has {n:,}: load it onto the same base "
                            "(architecture, num_classes, compression)")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
                 ) -> nn.Module:
    """Attach the SNELL/SNELLA adapter saved in ``path`` to ``model`` (in place) and load it.

    Returns:
        ``model``, adapted (trainable), with each unit's saved sparsity.

    Raises:
        TrimtuneError: missing / damaged files, another PEFT method's adapter, a base of
            another architecture or shape, or a model that already has an adapter.
    """
    path = Path(path)
    meta = read_json(path / CONFIG_NAME)
    kind = str(meta.get("peft_type") or "").upper()
    if kind not in ("SNELL", "SNELLA"):
        raise TrimtuneError(f"{path / CONFIG_NAME} is a {kind or 'untyped'} adapter, not "
                            "SNELL/SNELLA: open it with peft.PeftModel.from_pretrained (or the "
                            "tool that wrote it)")
    tensors = read_safetensors(path / WEIGHTS_NAME)
    if adapter_configs(model):
        raise TrimtuneError(f"this model already has an adapter attached "
                            f"({', '.join(map(repr, adapter_configs(model)))}): load onto a "
                            "fresh base or call trimtune.tuners.detach(model) first")
    _check_base(model, _read_base(path), path)
    cfg = config_from_dict(meta)
    cfg.inference_mode = False
    attach(model, cfg, adapter_name=adapter_name)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}  # a plain model
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if adapter_name in k or "snell_" in k]
    missing = [k for k in result.missing_keys if ".snell_units." in k]
    if unexpected or missing:
        raise TrimtuneError(f"adapter {path} does not fit this model (unexpected "
                            f"{unexpected[:3]}, missing {missing[:3]}): load it onto the base "
                            "it was trained on, or save the adapter again")
    return model
