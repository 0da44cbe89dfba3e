"""The one registry of fine-tuning methods.

One :class:`Method` per name of :data:`trimtune.names.METHODS` (the torch-free list the CLI
offers), filled by :func:`register_method` in the module that defines the method
(:mod:`.snell.attach`, :mod:`.peft_methods`, :mod:`.simple`; ``trimtune.tuners`` imports them):
its config class, how it attaches, which training callbacks it needs, how a
:class:`~trimtune.finetune_config.FinetuneConfig` becomes its config, its rank check and the
options a saved run rebuilds it from. Everything that dispatches on a method name asks here::

    model, callbacks = registry.attach(model, "lora", r=8)           # a name + options
    model, callbacks = registry.attach(model, SnellaConfig(r=8))      # or a config object
    plain = registry.merge(model)                                    # any method

Targets follow the one rule of :mod:`trimtune.tuners.targets` for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import TrimtuneError
from ..models.probe import Probe
from ..names import METHOD_SUMMARIES, METHODS
from .adapters import adapter_configs, detach, drop_method_state
from .adapters import merge as unload_peft


def _no_callbacks(model: nn.Module) -> list:
    return []


def _never(config: Any) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the CLI / config name (one of :data:`trimtune.names.METHODS`).
        config_class: the config its :attr:`attach` takes (None: keyword options only).
        holds: what its saved adapter holds.
        peft: its adapter is a Hugging Face PEFT adapter (``PeftModel.from_pretrained``).
        attach: ``(model, config_or_None, *, probe, **options) -> (model, callbacks)``, in
            place.
        from_finetune: ``(FinetuneConfig, total_steps or None) ->`` what :attr:`attach` takes
            for a run: a config object, or a dict of keyword options.
        callbacks: ``model -> callbacks`` for a model this method was attached to.
        owns_config: ``config -> bool``: the config object stands for this method.
        check: ``(model, FinetuneConfig) -> None``: refuse settings that do not fit the model
            (the rank check), before attaching; None: nothing to check.
        rebuild_options: the recorded options (``model.trimtune_method``, written into a saved
            adapter) that rebuild the method's trained tensors on load.
        summary: what trains, one line (default :data:`trimtune.names.METHOD_SUMMARIES`).
    """

    name: str
    config_class: type | None
    holds: str
    peft: bool
    attach: Callable[..., tuple[nn.Module, list]]
    from_finetune: Callable[[Any, int | None], Any]
    callbacks: Callable[[nn.Module], list] = _no_callbacks
    owns_config: Callable[[Any], bool] = _never
    check: Callable[[nn.Module, Any], None] | None = None
    rebuild_options: tuple[str, ...] = ()
    summary: str = ""


_CALLBACKS = "trimtune_callbacks"
#: name -> Method, in the order of :data:`trimtune.names.METHODS`
REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`REGISTRY` (once per name; its name must be one of
    :data:`trimtune.names.METHODS`, the list the CLI offers without importing torch)."""
    if method.name not in METHODS:
        raise TrimtuneError(f"method {method.name!r} is not in trimtune.names.METHODS: add it "
                            "there (the CLI's torch-free list) with its one-line summary")
    if method.name in REGISTRY:
        raise TrimtuneError(f"method {method.name!r} is registered twice")
    if not method.summary:
        object.__setattr__(method, "summary", METHOD_SUMMARIES[method.name])
    REGISTRY[method.name] = method
    ordered = sorted(REGISTRY.items(), key=lambda kv: METHODS.index(kv[0]))
    REGISTRY.clear()
    REGISTRY.update(ordered)
    return method


def check_complete() -> None:
    """Every name of :data:`trimtune.names.METHODS` has its registered :class:`Method`."""
    missing = [n for n in METHODS if n not in REGISTRY]
    if missing:
        raise TrimtuneError(f"methods named in trimtune.names.METHODS but never registered: "
                            f"{', '.join(missing)}")


def refuse_rank(cfg: Any, rank: int, layers: Sequence[tuple[str, int, int]],
                per_unit: bool = False) -> None:
    """The rank check of every method with a rank: ``rank`` (what the method will build from
    ``cfg.r``) at least 1 and at most ``min(d_in, d_out)`` of every ``(name, d_in, d_out)``
    target: above, it only adds memory (r x (d_in + d_out) per layer), never expressiveness,
    and a huge one exhausts the machine before the first step."""
    if rank < 1:
        raise TrimtuneError(f"r={cfg.r}: give a rank of 1 or more, e.g. 8")
    name, d_in, d_out = min(layers, key=lambda t: min(t[1], t[2]))
    if rank > min(d_in, d_out):
        raise TrimtuneError(
            f"rank {rank} is above min(d_in, d_out) = {min(d_in, d_out)} of target layer {name} "
            f"({d_in} -> {d_out}{' per unit' if per_unit else ''}): it would "
            f"only add memory; use r={min(d_in, d_out)} (--r {min(d_in, d_out)}) or less")


def get(name: str) -> Method:
    """The :class:`Method` called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TrimtuneError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}"
                            ) from None


def method_of_config(config: Any) -> str:
    """The method name a config object stands for."""
    for name, entry in REGISTRY.items():
        if entry.owns_config(config):
            return name
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
    if adapter_configs(model) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        model = unload_peft(model)
    model.__dict__.pop(_CALLBACKS, None)
    return drop_method_state(model)


def base_copy(model: nn.Module) -> nn.Module:
    """A copy of the base under the attached method (adapters removed, nothing merged)."""
    import copy

    base = copy.deepcopy(model)
    base.__dict__.pop(_CALLBACKS, None)
    if adapter_configs(base):
        base = detach(base)
    return drop_method_state(base)


__all__ = ["Method", "REGISTRY", "attach", "base_copy", "callbacks", "check_complete", "get",
           "merge", "method_of", "method_of_config", "refuse_rank", "register_method"]
