"""What every method leaves on a model, undone in one place: PEFT layers injected in place
(SNELL / SNELLA, LoRA, DoRA, AdaLoRA; ``model.peft_config``) are merged or detached by PEFT's
unloading rule, and a method's own state (masked-sparse's gradient masks, the
``trimtune_method`` record) is dropped. Used by :mod:`.registry`'s one merge."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import TrimtuneError

#: the names of the parameters that trained before an adapter was attached (restored on unload)
WAS_TRAINABLE = "_trimtune_was_trainable"


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter_name: PeftConfig}`` of the adapters attached to ``model`` (empty if none)."""
    cfg = getattr(model, "peft_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


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
    keep = getattr(model, WAS_TRAINABLE, None)
    if keep is not None:
        keep = set(keep)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        delattr(model, WAS_TRAINABLE)
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


def drop_method_state(model: nn.Module) -> nn.Module:
    """What a baseline leaves besides PEFT layers: masked-sparse's gradient hooks and masks
    (the weights already hold the update) and the ``trimtune_method`` record; in place.
    The PEFT layers themselves merge in :func:`trimtune.tuners.registry.merge`."""
    for module in model.modules():
        hook = getattr(module, "_trimtune_mask_hook", None)
        if hook is not None:
            hook.remove()
            del module._trimtune_mask_hook
            del module.trimtune_grad_mask
    if hasattr(model, "trimtune_method"):
        del model.trimtune_method
    return model


def remove_peft_layers(model: nn.Module) -> None:
    """Replace every PEFT layer by its base layer (nothing merged), in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in [(n, m) for n, m in model.named_modules()
                        if isinstance(m, BaseTunerLayer)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                layer.get_base_layer())


__all__ = ["WAS_TRAINABLE", "adapter_configs", "detach", "drop_method_state", "merge",
           "remove_peft_layers"]
