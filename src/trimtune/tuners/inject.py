"""Attach SNELL / SNELLA to any model by name pattern; merge, detach, count trainables.

The model stays the user's own module (a timm model): targets are wrapped in place by
:class:`~trimtune.tuners.snell.SnellLinear`, no model class changes. ``attach`` records what
it did in ``model.trimtune_adapter``::

    {"method": "snell" | "snella", "config": SnellConfig, "targets": [module names],
     "modules_to_save": [module names], "tokens": [parameter names],
     "requires_grad": [parameter names trainable before attach]}
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from ..errors import TrimtuneError
from ..models.probe import Probe, check_forward_path, route_through_modules
from .config import DEFAULT_TARGETS, SnellConfig
from .kernels import create_kernel
from .snell import SnellLinear, SparseDelta


def _as_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    if patterns is None:
        return (DEFAULT_TARGETS,)
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def name_matches(name: str, patterns: str | Sequence[str]) -> bool:
    """True when a regex matches ``name`` in full or one of its dotted suffixes."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in _as_patterns(patterns))


LOWRANK_FACTOR = "second"  # the factor a matched factorised layer contributes (see find_targets)


def _is_factorised(mod: nn.Module) -> bool:
    """A ``trimtune.lowrank.LowRankLinear`` (or a stand-in with ``.first`` / ``.second``)."""
    return isinstance(getattr(mod, "first", None), nn.Linear) and isinstance(
        getattr(mod, "second", None), nn.Linear)


def find_targets(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules that ``patterns`` select, in model order.

    A matched factorised layer (``trimtune.lowrank.LowRankLinear``, ``W = W2 W1``) gets ONE
    update, on its ``.second`` factor (r -> out): ``W2 + dW2``, merged exactly into ``W2``,
    so tuning a compressed model adds no more units than the dense one had, and keeps for
    backward only the r-wide input of ``.second`` (rather than the in-wide input of ``.first``
    as well). Its factors' own names then do not count again; a pattern that matches a factor
    but not the layer (e.g. ``"qkv\\.first"``) selects that factor.

    Raises:
        TrimtuneError: when no ``nn.Linear`` matches.
    """
    found: list[str] = []
    owners: set[str] = set()  # matched factorised layers: their factors are already decided
    for name, mod in model.named_modules():
        if not name or not name_matches(name, _as_patterns(patterns)):
            continue
        if name.rpartition(".")[0] in owners:
            continue
        if isinstance(mod, nn.Linear):
            names = [name]
        elif _is_factorised(mod):
            owners.add(name)
            names = [f"{name}.{LOWRANK_FACTOR}"]
        else:
            continue
        found += [n for n in names if n not in found]
    if not found:
        raise TrimtuneError(f"target_modules {patterns!r} match no nn.Linear of this "
                            f"{type(model).__name__}: check the names in model.named_modules()")
    return found


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _is_fused_qkv(name: str) -> bool:
    base = name[: -len(".second")] if name.endswith(".second") else name
    return base == "qkv" or base.endswith(".qkv")


def make_layer(base: nn.Linear, config: SnellConfig, name: str = "") -> SnellLinear:
    """Wrap one frozen linear in a :class:`SnellLinear` following ``config``.

    A fused ``qkv`` (or the ``.second`` factor of a compressed one) whose output divides by 3
    gets three units of ``out / 3`` when ``config.split_qkv``; ``attn.proj`` gets no dropout.
    """
    n_units = 3 if config.split_qkv and _is_fused_qkv(name) and base.out_features % 3 == 0 else 1
    units = [SparseDelta(base.in_features, base.out_features // n_units, config.rank,
                         create_kernel(config.kernel, config.segments, config.learnable_coeffs),
                         sparsity=config.initial_sparsity, sparsify=config.unit_sparsify,
                         recompute=config.recompute)
             for _ in range(n_units)]
    w = base.weight
    units = [u.to(device=w.device, dtype=w.dtype) for u in units]
    dropout = 0.0 if re.search(r"(^|\.)attn\.proj(\.|$)", name) else config.dropout
    return SnellLinear(base, units, dropout=dropout, drop_path=config.drop_path,
                       fused=config.fused)


def attach(model: nn.Module, config: SnellConfig, *, probe: Probe = True) -> nn.Module:
    """Freeze ``model``, wrap its targets with sparse kernelised updates; in place.

    Trainable afterwards: ``snell_A`` / ``snell_B`` and learnable kernel scalars of every
    unit, every parameter of ``config.modules_to_save`` and the ``config.train_tokens``.

    A probe forward / backward then proves every wrapper is called and every unit reached by
    the gradient (:func:`trimtune.models.probe.check_forward_path`; ``probe``: True builds a
    random batch from the model, an example input is used as given, False skips it).

    Returns:
        ``model`` itself, with ``model.trimtune_adapter`` set.

    Raises:
        TrimtuneError: the model already has an adapter, the patterns match nothing, or a
            wrapper is not on the forward path (the model is left as it was).
    """
    if not isinstance(config, SnellConfig):
        raise TrimtuneError(f"attach() got a {type(config).__name__}: use SnellConfig or "
                            "SnellaConfig (LoRA & co. live in trimtune.tuners.baselines)")
    if getattr(model, "trimtune_adapter", None) is not None or any(
            isinstance(m, SnellLinear) for m in model.modules()):
        raise TrimtuneError("this model already has an adapter attached: call "
                            "trimtune.tuners.merge(model) or detach(model) first")
    targets = find_targets(model, config.target_modules)
    was_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model.requires_grad_(False)
    route_through_modules(model)
    for name in targets:
        _set_module(model, name, make_layer(model.get_submodule(name), config, name))
    saved = [n for n, m in model.named_modules()
             if n and config.modules_to_save and name_matches(n, config.modules_to_save)]
    saved = [n for n in saved if not any(n.startswith(o + ".") for o in saved if o != n)]
    for n in saved:
        model.get_submodule(n).requires_grad_(True)
    tokens = [n for n, _ in model.named_parameters(recurse=True)
              if config.train_tokens and name_matches(n, config.train_tokens)]
    for n in tokens:
        model.get_parameter(n).requires_grad_(True)
    model.trimtune_adapter = {
        "method": config.method, "config": config, "targets": targets,
        "modules_to_save": saved, "tokens": tokens, "requires_grad": was_trainable,
    }
    try:
        check_forward_path(model, targets, probe, what=f"attach({config.method})")
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


def _unwrap(model: nn.Module, fold: bool) -> nn.Module:
    layers = list(iter_snell_layers(model))
    if not layers:
        raise TrimtuneError("this model has no SNELL/SNELLA adapter: nothing to merge or detach "
                            "(attach one with trimtune.tuners.attach)")
    for name, layer in layers:
        layer.merge() if fold else layer.unmerge()
        _set_module(model, name, layer.base)
    info = getattr(model, "trimtune_adapter", None) or {}
    if "requires_grad" in info:
        model.requires_grad_(False)
        keep = set(info["requires_grad"])
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
    if hasattr(model, "trimtune_adapter"):
        del model.trimtune_adapter
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight (``W += dW_s^T``) and remove the wrappers.

    Returns the same ``model``, now a plain module (timm model) computing what the adapted
    model computes in eval mode; trained head / tokens stay; ``requires_grad`` flags are
    restored to what they were before :func:`attach`.
    """
    return _unwrap(model, fold=True)


def detach(model: nn.Module) -> nn.Module:
    """Remove the wrappers without merging: the base model as it was (head / tokens trained)."""
    return _unwrap(model, fold=False)


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
