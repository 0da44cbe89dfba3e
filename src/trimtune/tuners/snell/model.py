"""SNELL / SNELLA as PEFT tuners: the ``BaseTuner`` classes ``peft.get_peft_model`` builds from a
:class:`~trimtune.tuners.snell.config.SnellConfig` / ``SnellaConfig`` (registered with PEFT on
import, :mod:`.peft_types`); their layers are :class:`~trimtune.tuners.snell.layer.SnellLinear`.
"""

from __future__ import annotations

import re
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...errors import TrimtuneError
from ..targets import matches, select_linears
from .config import SnellaConfig, SnellConfig
from .layer import _ADAPTER_DICTS, SnellLayer, SnellLinear
from .peft_types import PREFIX, register


class SnellModel(BaseTuner):
    """Creates a SNELL model (``peft.get_peft_model(model, SnellConfig(...))``).

    Target selection is trimtune's one rule (:func:`trimtune.tuners.targets.select_linears`,
    PEFT's semantics plus factorised layers); a pattern that matches nothing is an error that
    names the closest module names. ``train_tokens`` (the cls token) train in full and are
    saved with the adapter.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SnellLayer
    #: PEFT's per-model-type defaults (trimtune resolves None itself: targets.default_targets)
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SnellConfig, model_config: dict
                                ) -> SnellConfig:
        return peft_config  # None target_modules: resolved per model in _prepare_model

    def _prepare_model(self, peft_config: SnellConfig, model: nn.Module) -> None:
        self._snell_targets = set(select_linears(
            model, peft_config.target_modules, exclude=peft_config.exclude_modules,
            modules_to_save=peft_config.modules_to_save))

    def _check_target_module_exists(self, peft_config: SnellConfig, key: str) -> bool:
        targets = getattr(self, "_snell_targets", None)
        if targets is None:  # outside inject_adapter (e.g. inspect_matched_modules)
            targets = set(select_linears(self.model, peft_config.target_modules,
                                         exclude=peft_config.exclude_modules,
                                         modules_to_save=peft_config.modules_to_save))
        return key in targets

    def _create_and_replace(self, peft_config: SnellConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str,
                            **optional_kwargs: Any) -> None:
        if isinstance(target, SnellLayer):
            target.update_layer(adapter_name, peft_config, current_key,
                                inference_mode=peft_config.inference_mode)
            return
        if isinstance(target, BaseTunerLayer):
            raise TrimtuneError(f"{current_key} already carries a {type(target).__name__} adapter"
                                " of another method: one PEFT method per model")
        new = SnellLinear(target, adapter_name, peft_config, current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not automatically trainable
        self._replace_module(parent, target_name, new, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for a in self.active_adapters:
            tokens = getattr(self.peft_config.get(a), "train_tokens", None)
            if tokens and not self.peft_config[a].inference_mode:
                for n, p in model.named_parameters():
                    if matches(n, tokens):
                        p.requires_grad_(True)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict,
                                              unwanted_adapter_names)
        tokens = getattr(config, "train_tokens", None)
        if tokens:
            out.update({k: v for k, v in state_dict.items() if matches(k, tokens)})
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...qkv.snell_units.<adapter>.0.snell_A`` -> ``...qkv.snell_units.0.snell_A``."""
        pat = rf"\.({'|'.join(_ADAPTER_DICTS)})\.{re.escape(adapter_name)}(?=\.|$)"
        return re.sub(pat, r".\1", key)


class SnellaModel(SnellModel):
    """Creates a SNELLA model: SNELL layers whose sparsities a
    :class:`~trimtune.tuners.snell.allocator.SnellaAllocator` reallocates during training (with HF
    Trainer: :class:`SnellaTrainerCallback`)."""


register({"snell": SnellConfig, "snella": SnellaConfig},
         {"snell": SnellModel, "snella": SnellaModel})


__all__ = ["SnellModel", "SnellaModel"]
