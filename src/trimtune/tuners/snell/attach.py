"""Attach SNELL / SNELLA to any model in place; merge, detach, count trainables.

:func:`attach` is a thin call into the PEFT tuner (:mod:`.layer`,
``peft.inject_adapter_in_model``): the model stays the user's own module (a timm or
transformers model, never a ``PeftModel``), its targets become
:class:`~.layer.SnellLinear` layers, and ``model.peft_config`` records
``{adapter_name: config}`` as PEFT does. :func:`merge` / :func:`detach` undo it for any PEFT
method injected this way (PEFT's own unloading rule).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

from peft import PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...errors import TrimtuneError
from ...models.probe import Probe, check_forward_path, route_through_modules
from ..adapters import WAS_TRAINABLE, adapter_configs, detach
from ..registry import Method, refuse_rank, register_method
from ..targets import select_linears
from .config import SnellaConfig, SnellConfig
from .delta import SparseDelta
from .layer import SnellLinear, is_fused_qkv

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
                            "SnellaConfig (LoRA & co.: trimtune.tuners.peft_methods)")
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
    setattr(model, WAS_TRAINABLE, was_trainable)
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


# ----------------------------------------------------------------------------- the registry
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
    from .allocator import SnellaAllocator

    cfgs = [c for c in adapter_configs(model).values() if isinstance(c, SnellaConfig)]
    return [SnellaAllocator(model, cfgs[0])] if cfgs else []


def _registry_attach(name: str):
    def attach_method(model: nn.Module, config: Any = None, *, probe: Probe = True,
                      **options: Any) -> tuple[nn.Module, list]:
        attach(model, _snell_config(name, config, options), probe=probe)
        return model, (_snella_callbacks(model) if name == "snella" else [])

    return attach_method


def from_finetune(cfg: Any, total_steps: int | None = None) -> SnellConfig:
    """The :class:`SnellConfig` / ``SnellaConfig`` of a SNELL-family run (a
    :class:`~trimtune.finetune_config.FinetuneConfig`); ``method_kwargs`` win."""
    common = {"r": cfg.r, "dropout": cfg.branch_dropout, "drop_path": cfg.branch_drop_path,
              "target_modules": cfg.target_modules, **cfg.method_kwargs}  # method_kwargs win
    if cfg.kernel:
        common["kernel"] = cfg.kernel
    klass = SnellConfig if cfg.method == "snell" else SnellaConfig
    known = {f.name for f in dataclasses.fields(klass)}
    for k in cfg.method_kwargs:
        if k not in known:
            import difflib
            near = difflib.get_close_matches(k, sorted(known), n=3)
            raise TrimtuneError(f"unknown {cfg.method} option {k!r} in method_kwargs"
                                + (f"; did you mean {', '.join(near)}?" if near else "")
                                + f" ({klass.__name__} fields: see "
                                  f"help(trimtune.{klass.__name__}))")
    if cfg.method == "snell":
        return SnellConfig(sparsity=cfg.target_sparsity, **common)
    return SnellaConfig(target_sparsity=cfg.target_sparsity, init_sparsity=cfg.init_sparsity,
                        schedule_unit=cfg.schedule_unit, interval=cfg.alloc_interval,
                        t_init=cfg.t_init, t_final=cfg.t_final, **common)


def check_rank(model: nn.Module, cfg: Any) -> None:
    """``cfg.r`` against every unit a run would build (a fused qkv: three units)."""
    tcfg = from_finetune(cfg)
    layers = []
    for name in select_linears(model, tcfg.target_modules, exclude=tcfg.exclude_modules,
                               modules_to_save=tcfg.modules_to_save):
        lin = model.get_submodule(name)
        split = 3 if tcfg.split_qkv and is_fused_qkv(name) and lin.out_features % 3 == 0 else 1
        layers.append((name, lin.in_features, lin.out_features // split))
    refuse_rank(cfg, cfg.r, layers, per_unit=True)


_HOLDS = ("per unit snell_A, snell_B, kernel scalars and the zeroed count; head copy; "
          "cls token")
for _name, _klass in (("snella", SnellaConfig), ("snell", SnellConfig)):
    register_method(Method(
        name=_name, config_class=_klass, holds=_HOLDS, peft=True,
        attach=_registry_attach(_name), from_finetune=from_finetune,
        **({"callbacks": _snella_callbacks} if _name == "snella" else {}),
        owns_config=lambda c, n=_name: isinstance(c, SnellConfig) and c.method == n,
        check=check_rank))
