"""Which layers a method adapts: ONE rule for every method, ``modules_to_save`` and compression.

The rule is Hugging Face PEFT's (``peft.tuners.tuners_utils.check_target_module_exists``):

- a **string** is a regex that must match the whole qualified module name
  (``r".*\\.(qkv|fc1)"``); ``"all-linear"`` means every linear layer except ``modules_to_save``;
- a **list** holds names or dotted name suffixes (``["qkv", "mlp.fc1"]`` matches
  ``blocks.0.attn.qkv`` and ``blocks.3.mlp.fc1``, not ``blocks.0.attn.qkv_norm``).

``exclude`` patterns follow the same rule. A matched factorised layer (trimtune.lowrank's
``LowRankLinear``, which has ``.first`` / ``.second``) gets one update, on ``.second``
(:data:`LOWRANK_FACTOR`). Modules
inside an adapter layer (a PEFT ``base_layer``, a ``ModulesToSaveWrapper`` copy) are never
targets; an adapter layer around a linear counts as that linear (a second adapter).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import TrimtuneError

ALL_LINEAR = "all-linear"
#: the factor a matched factorised layer (``W = W2 W1``) contributes: ONE update on ``.second``
#: (r -> out), merged exactly into ``W2``; as many units as the dense model had, and only the
#: r-wide input of ``.second`` kept for backward. A pattern that matches a factor but not the
#: layer (``r".*qkv\.(first|second)"``) selects that factor.
LOWRANK_FACTOR = "second"

#: Default targets per model family when ``target_modules`` is None: timm ViTs (fused ``qkv`` or
#: separate ``q``/``k``/``v``, the projection and the MLP) and Hugging Face ViT / DINOv2.
DEFAULT_TARGETS: dict[str, str | list[str]] = {
    "timm": r"(.*\.)?(qkv|q|k|v|attn\.proj|mlp\.fc1|mlp\.fc2)",
    "vit": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
            "output.dense"],
    "dinov2": ["query", "key", "value", "attention.output.dense", "mlp.fc1", "mlp.fc2"],
}

Patterns = str | Sequence[str] | None


def model_family(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model, else ``"timm"``."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or "timm")


def default_targets(model: nn.Module) -> str | list[str]:
    """The default ``target_modules`` for ``model`` (:data:`DEFAULT_TARGETS`)."""
    return DEFAULT_TARGETS.get(model_family(model), DEFAULT_TARGETS["timm"])


def matches(name: str, patterns: Patterns) -> bool:
    """PEFT's rule: a string fully matches as a regex, a list entry equals the name or a dotted
    suffix of it. ``None`` / empty matches nothing."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _inside_adapters(model: nn.Module) -> set[str]:
    """Names of modules that live inside an adapter layer or a modules-to-save wrapper."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            inner.update(f"{name}.{sub}" if name else sub
                         for sub, _ in mod.named_modules() if sub)
    return inner


def _as_linear(mod: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(mod, BaseTunerLayer):
        mod = mod.get_base_layer()
    return isinstance(mod, nn.Linear)


def _is_factorised(mod: nn.Module) -> bool:
    return all(_as_linear(getattr(mod, n, None) or nn.Identity()) for n in ("first", "second"))


def _closest(patterns: Patterns, names: list[str], n: int = 3) -> list[str]:
    """Module names that look most like the patterns (for an error message)."""
    words = [patterns] if isinstance(patterns, str) else list(patterns or ())
    found: list[str] = []
    for w in words:
        tail = re.sub(r"[^A-Za-z0-9_.]", "", w.split("|")[0])
        cand = difflib.get_close_matches(w, names, n=n, cutoff=0.3)
        cand += [m for m in names if tail and tail in m][:n]
        short = {m.rsplit(".", 1)[-1] for m in names}
        cand += difflib.get_close_matches(tail or w, sorted(short), n=n, cutoff=0.5)
        found += [c for c in cand if c not in found]
    return found[: 2 * n] or names[:n]


def select_linears(model: nn.Module, patterns: Patterns = None, *, exclude: Patterns = None,
                   modules_to_save: Patterns = None) -> list[str]:
    """Qualified names of the linear layers ``patterns`` select, in model order.

    Args:
        model: any module (timm, transformers, trimtune-compressed).
        patterns: PEFT's ``target_modules`` (see the module docstring); ``None``: the model
            family's default (:func:`default_targets`).
        exclude: PEFT's ``exclude_modules``.
        modules_to_save: never targets (PEFT: adapters never wrap a module to save).

    Raises:
        TrimtuneError: nothing matches; the message names the closest module names.
    """
    if patterns is None:
        patterns = default_targets(model)
    all_linear = isinstance(patterns, str) and patterns.lower() == ALL_LINEAR
    inner = _inside_adapters(model)
    found: list[str] = []
    owners: set[str] = set()  # matched factorised layers: their factors are already decided
    saved = [n for n, _ in model.named_modules() if n and matches(n, modules_to_save)]
    for name, mod in model.named_modules():
        if not name or name in inner or matches(name, exclude):
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if not (all_linear or matches(name, patterns)) or name.rpartition(".")[0] in owners:
            continue
        if _as_linear(mod):
            names = [name]
        elif not all_linear and _is_factorised(mod):
            owners.add(name)
            names = [f"{name}.{LOWRANK_FACTOR}"]
        else:
            continue
        found += [n for n in names if n not in found and not matches(n, exclude)]
    if not found:
        linears = [n for n, m in model.named_modules() if n and n not in inner and _as_linear(m)]
        raise TrimtuneError(
            f"target_modules={patterns!r} match no linear layer of this {type(model).__name__} "
            f"(PEFT's rule: a string is a regex over the whole name, a list holds names or name "
            f"suffixes); closest module names: {', '.join(_closest(patterns, linears))}")
    return found


def select_modules(model: nn.Module, patterns: Iterable[str] | str | None) -> list[str]:
    """Outermost modules whose names match (for ``modules_to_save``), in model order.

    Raises:
        TrimtuneError: a list entry that matches no module (names the closest ones).
    """
    if not patterns:
        return []
    names = [n for n, _ in model.named_modules() if n]
    hit = [n for n in names if matches(n, patterns)]
    hit = [n for n in hit if not any(n.startswith(o + ".") for o in hit if o != n)]
    words = [patterns] if isinstance(patterns, str) else list(patterns)
    missing = [w for w in words if not any(matches(n, [w] if not isinstance(patterns, str)
                                                   else w) for n in names)]
    if missing:
        raise TrimtuneError(f"modules_to_save {missing} match no module of this "
                            f"{type(model).__name__}; closest module names: "
                            f"{', '.join(_closest(missing, names))} (timm: "
                            "model.default_cfg['classifier'], transformers: 'classifier')")
    return hit


__all__ = ["ALL_LINEAR", "DEFAULT_TARGETS", "default_targets", "matches", "model_family",
           "select_linears", "select_modules"]
