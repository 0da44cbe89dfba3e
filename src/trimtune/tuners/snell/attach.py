"""Attach SNELL / SNELLA to any model in place; merge, detach, count trainables.

:func:`attach` is a thin call into the PEFT tuner (:mod:`.layer`,
``peft.inject_adapter_in_model``): the model stays the user's own module (a timm or
transformers model, never a ``PeftModel``), its targets become
:class:`~.layer.SnellLinear` layers, and ``model.peft_config`` records
``{adapter_name: config}`` as PEFT does. :func:`merge` / :func:`detach` undo it for any PEFT
method injected this way (PEFT's own unloading rule).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ...errors import TrimtuneError
from ...models.probe import Probe, check_forward_path, route_through_modules
from .config import SnellConfig
from .delta import SparseDelta
from .layer import SnellLinear

_WAS_TRAINABLE = "_trimtune_was_trainable"


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter_name: PeftConfig}`` of the adapters attached to ``model`` (empty if none)."""
    cfg = getattr(model, "peft_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def attach(model: nn.Module, config: SnellConfig, adapter_name: str = "default", *,
           probe: Probe = True) -> nn.Module:
    """Freeze ``model`` and wrap its targets with sparse kernelised updates, in place.

    Trainable afterwards: ``snell_A`` / ``snell_B`` and learnable kernel scalars of every
    unit, the ``config.modules_to_save`` (PEFT's wrapper) and the ``config.train_tokens``.

    Returns:
        ``model`` itself; ``model.peft_config == {adapter_name: config}``.

    Raises:
        TrimtuneError: not a SNELL/SNELLA config, the model already has an adapter (or is a
            ``PeftModel``), or the patterns match nothing (the message names close names).
    """
    if not isinstance(config, SnellConfig):
        raise TrimtuneError(f"attach() got a {type(config).__name__}: use SnellConfig or "
                            "SnellaConfig (LoRA & co.: trimtune.tuners.baselines)")
    if isinstance(model, PeftModel):
        raise TrimtuneError("attach() takes the plain model, not a PeftModel: use "
                            "PeftModel.add_adapter for a second adapter there")
    existing = adapter_configs(model)
    if existing or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        names = ", ".join(repr(n) for n in existing) or "unnamed"
        raise TrimtuneError(f"this model already has an adapter attached ({names}): call "
                            "trimtune.merge(model) or trimtune.tuners.detach(model) first, or "
                            "use peft.PeftModel for several adapters")
    was_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    route_through_modules(model)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    setattr(model, _WAS_TRAINABLE, was_trainable)
    try:  # a probe forward / backward proves every wrapper is on the forward path
        check_forward_path(model, [n for n, _ in iter_snell_layers(model)], probe,
                           what=f"attach({config.method})")
    except TrimtuneError:
        detach(model)
        raise
    return model


def iter_snell_layers(model: nn.Module) -> Iterator[tuple[str, SnellLinear]]:
    """``(name, SnellLinear)`` pairs of a model, in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, SnellLinear):
            yield name, mod


def iter_units(model: nn.Module) -> Iterator[tuple[str, SparseDelta]]:
    """``(name, SparseDelta)`` pairs: every competing update block (what the allocator sees)."""
    for name, mod in model.named_modules():
        if isinstance(mod, SparseDelta):
            yield name, mod


def _unload(model: nn.Module, fold: bool) -> nn.Module:
    """PEFT's unloading, for a model with layers injected in place (no ``BaseTuner`` kept)."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload() if fold else model.unload()
    tuner_names = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    wrappers = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    if not tuner_names and not wrappers:
        raise TrimtuneError("this model has no adapter: nothing to merge or detach (attach one "
                            "with trimtune.attach)")
    for name, mod in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if not name or any(parent_name == t or parent_name.startswith(t + ".")
                           for t in tuner_names | set(wrappers)):
            continue
        if hasattr(mod, "unload_and_optionally_merge_module"):
            new = mod.unload_and_optionally_merge_module(merge=fold, safe_merge=False,
                                                         adapter_names=None)
        elif isinstance(mod, BaseTunerLayer):
            if fold:
                with torch.no_grad():
                    mod.merge()
            new = mod.get_base_layer()
        else:
            continue
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    keep = getattr(model, _WAS_TRAINABLE, None)
    if keep is not None:
        keep = set(keep)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        delattr(model, _WAS_TRAINABLE)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight (``W += dW^T``) and remove the wrappers.

    Returns the plain model (the same object, or a ``PeftModel``'s base model) computing what
    the adapted model computes in eval mode; trained ``modules_to_save`` / tokens stay;
    ``requires_grad`` flags are restored to what they were before :func:`attach`.
    """
    return _unload(model, fold=True)


def detach(model: nn.Module) -> nn.Module:
    """Remove the wrappers without merging: the base model as it was (trained head / tokens
    kept)."""
    return _unload(model, fold=False)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Trainable parameter counts by group.

    Returns:
        ``{"adapter": snell_A + snell_B, "kernel": learnable kernel scalars,
        "other": other trainables (head, tokens), "trainable": total trainable,
        "total": all parameters, "percent": 100 * trainable / total}``.
    """
    groups = {"adapter": 0, "kernel": 0, "other": 0}
    total = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("snell_A", "snell_B"):
            groups["adapter"] += p.numel()
        elif ".kernel." in n and ".snell_units." in n:
            groups["kernel"] += p.numel()
        else:
            groups["other"] += p.numel()
    trainable = sum(groups.values())
    return {**groups, "trainable": trainable, "total": total,
            "percent": 100.0 * trainable / max(total, 1)}


def format_summary(summary: dict[str, float]) -> str:
    """One line: ``trainable 5,309,184 / 91,000,000 (5.83%) = adapter ... + kernel ... + ...``."""
    s = summary
    return (f"trainable {s['trainable']:,} / {s['total']:,} ({s['percent']:.2f}%) = adapter "
            f"{s['adapter']:,} + kernel {s['kernel']:,} + other {s['other']:,}")
