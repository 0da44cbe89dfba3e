"""The one registry of fine-tuning methods.

One :class:`Method` per name of :data:`trimtune.names.METHODS` (the torch-free list the CLI
offers): its config class, how it attaches, which training callbacks it needs, how it merges
and what its adapter holds. Everything that dispatches on a method name asks here::

    model, callbacks = registry.attach(model, "lora", r=8)           # a name + options
    model, callbacks = registry.attach(model, SnellaConfig(r=8))      # or a config object
    plain = registry.merge(model)                                    # any method

Targets follow the one rule of :mod:`trimtune.tuners.targets` for every method.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from torch import nn

from ..errors import TrimtuneError
from ..models.probe import Probe
from ..names import METHOD_SUMMARIES, METHODS, SNELL_METHODS
from . import baselines
from .snell.config import SnellaConfig, SnellConfig
from .snell.attach import adapter_configs
from .snell.attach import attach as attach_snell
from .snell.attach import merge as unload_peft


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the CLI / config name.
        summary: what trains, one line.
        config_class: the config its :attr:`attach` takes (None: keyword options only).
        holds: what its saved adapter holds.
        peft: its adapter is a Hugging Face PEFT adapter (``PeftModel.from_pretrained``).
        attach: ``(model, config_or_None, **options) -> (model, callbacks)``, in place.
        callbacks: ``model -> callbacks`` for a model this method was attached to.
    """

    name: str
    summary: str
    config_class: type | None
    holds: str
    peft: bool
    attach: Callable[..., tuple[nn.Module, list]]
    callbacks: Callable[[nn.Module], list]


_CALLBACKS = "trimtune_callbacks"


def _no_callbacks(model: nn.Module) -> list:
    return []


# ----------------------------------------------------------------------------- SNELL / SNELLA
def _snell_config(name: str, config: Any, options: dict[str, Any]) -> SnellConfig:
    klass = SnellaConfig if name == "snella" else SnellConfig
    if config is None:
        if "rank" in options:
            if "r" in options:
                raise TrimtuneError(f"{name}: rank= and r= both given; rank is the old spelling "
                                    "of r: pass r= only")
            warnings.warn(f"{name}: rank= is deprecated, use r= (same meaning)",
                          DeprecationWarning, stacklevel=4)
            options["r"] = options.pop("rank")
        try:
            return klass(**options)
        except TypeError as e:
            raise TrimtuneError(f"{name}: {e}; the options are {klass.__name__}'s fields") from e
    if options:
        raise TrimtuneError(f"{name}: give options in the config or as keywords, not both "
                            f"({sorted(options)})")
    if type(config) is not klass:
        raise TrimtuneError(f"method {name!r} takes a {klass.__name__}, got "
                            f"{type(config).__name__}")
    return config


def _snella_callbacks(model: nn.Module) -> list:
    from .snell.allocator import SnellaAllocator

    cfgs = [c for c in adapter_configs(model).values() if isinstance(c, SnellaConfig)]
    return [SnellaAllocator(model, cfgs[0])] if cfgs else []


def _attach_snell(name: str) -> Callable[..., tuple[nn.Module, list]]:
    def attach(model: nn.Module, config: Any = None, *, probe: Probe = True,
               **options: Any) -> tuple[nn.Module, list]:
        cfg = _snell_config(name, config, options)
        attach_snell(model, cfg, probe=probe)
        return model, (_snella_callbacks(model) if name == "snella" else [])

    return attach


# ----------------------------------------------------------------------------- baselines
def _attach_baseline(name: str) -> Callable[..., tuple[nn.Module, list]]:
    def attach(model: nn.Module, config: Any = None, *, probe: Probe = True,
               **options: Any) -> tuple[nn.Module, list]:
        if config is not None:
            return baselines.attach_peft_config(model, config, probe=probe, **options)
        return baselines.prepare_method(model, name, probe=probe, **options)

    return attach


_HOLDS = {
    "snella": "per unit snell_A, snell_B, kernel scalars and the zeroed count; head copy; "
              "cls token",
    "snell": "per unit snell_A, snell_B, kernel scalars and the zeroed count; head copy; "
             "cls token",
    "lora": "lora_A, lora_B of every target; the head",
    "dora": "lora_A, lora_B and the magnitude vector of every target; the head",
    "adalora": "lora_A, lora_E, lora_B and the rank mask of every target; the head",
    "full": "every trained tensor",
    "linear": "the head",
    "bitfit": "every bias and the head",
    "masked-sparse": "the masked target weights and the head",
}


def _build() -> dict[str, Method]:
    from peft import AdaLoraConfig, LoraConfig

    table: dict[str, Method] = {}
    for name in METHODS:
        snell = name in SNELL_METHODS
        config_class = {"snella": SnellaConfig, "snell": SnellConfig, "lora": LoraConfig,
                        "dora": LoraConfig, "adalora": AdaLoraConfig}.get(name)
        table[name] = Method(
            name=name, summary=METHOD_SUMMARIES[name], config_class=config_class,
            holds=_HOLDS[name], peft=snell,
            attach=_attach_snell(name) if snell else _attach_baseline(name),
            callbacks=_snella_callbacks if name == "snella" else _no_callbacks)
    return table


REGISTRY: dict[str, Method] = _build()


def get(name: str) -> Method:
    """The :class:`Method` called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TrimtuneError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}"
                            ) from None


def method_of_config(config: Any) -> str:
    """The method name a config object stands for."""
    if isinstance(config, SnellConfig):
        return config.method
    kind = str(getattr(getattr(config, "peft_type", None), "value", "")).lower()
    if kind == "lora":
        return "dora" if getattr(config, "use_dora", False) else "lora"
    if kind in REGISTRY:
        return kind
    raise TrimtuneError(f"a {type(config).__name__} is not a method trimtune runs: use one of "
                        f"{', '.join(REGISTRY)} (their config classes: SnellaConfig, "
                        "SnellConfig, peft.LoraConfig, peft.AdaLoraConfig)")


def method_of(model: nn.Module) -> str | None:
    """The method attached to ``model`` (None for a plain model)."""
    for cfg in adapter_configs(model).values():
        return method_of_config(cfg)
    info = getattr(model, "trimtune_method", None)
    return info.get("method") if isinstance(info, dict) else None


def attach(model: nn.Module, method: str | Any, *, probe: Probe = True,
           **options: Any) -> nn.Module:
    """Attach ``method`` to ``model`` in place and return it: a name of
    :data:`~trimtune.names.METHODS` with keyword options (``r``, ``target_modules``, ...), or a
    config object (``SnellaConfig(...)``, ``peft.LoraConfig(...)``). The training callbacks the
    method needs (SNELLA's allocator, AdaLoRA's) wait in :func:`callbacks` for the loop.
    ``probe``: a probe forward / backward then proves every adapted layer is called and
    reached by the gradient, else the model is put back as it was and a TrimtuneError names
    the layer (:func:`trimtune.models.probe.check_forward_path`; True: a random batch built
    from the model, a tensor: that input, False: no check).

    Raises:
        TrimtuneError: an unknown method or option, or a model that already has one.
    """
    if isinstance(method, str):
        name, config = method, None
    else:
        name, config = method_of_config(method), method
    entry = get(name)
    if isinstance(model, PeftModel):
        raise TrimtuneError("attach() takes the plain model, not a PeftModel: use "
                            "PeftModel.add_adapter for a second adapter there")
    if method_of(model) is not None:
        raise TrimtuneError(f"this model already has an adapter attached ({method_of(model)}):"
                            " call trimtune.merge(model) first, or fine-tune it as it is")
    model, cbs = entry.attach(model, config, probe=probe, **options)
    model.__dict__[_CALLBACKS] = cbs  # a plain attribute: not a submodule, not saved
    return model


def callbacks(model: nn.Module) -> list:
    """The training callbacks of the method attached to ``model`` (those :func:`attach` made,
    else built from the attached config)."""
    cbs = model.__dict__.get(_CALLBACKS)
    if cbs is not None:
        return list(cbs)
    name = method_of(model)
    return get(name).callbacks(model) if name else []


def merge(model: nn.Module) -> nn.Module:
    """Fold whatever method is attached into plain layers (the ONE merge); returns the plain
    model. PEFT layers (SNELL, SNELLA, LoRA, DoRA, AdaLoRA) merge and unwrap by PEFT's rule;
    masked-sparse drops its gradient masks; full / linear / bitfit have nothing to fold."""
    name = method_of(model)
    if name is None:
        raise TrimtuneError("this model has no adapter: nothing to merge (attach one with "
                            "trimtune.attach)")
    if name in ("lora", "dora", "adalora") or adapter_configs(model):
        model = unload_peft(model)
    model.__dict__.pop(_CALLBACKS, None)
    return baselines.drop_method_state(model)


def base_copy(model: nn.Module) -> nn.Module:
    """A copy of the base under the attached method (adapters removed, nothing merged)."""
    import copy

    from .snell.attach import detach

    base = copy.deepcopy(model)
    base.__dict__.pop(_CALLBACKS, None)
    if adapter_configs(base):
        base = detach(base)
    return baselines.drop_method_state(base)


__all__ = ["Method", "REGISTRY", "attach", "base_copy", "callbacks", "get", "merge", "method_of",
           "method_of_config"]
