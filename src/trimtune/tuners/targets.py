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
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import TrimtuneError

ALL_LINEAR = "all-linear"
#: the factor a matched factorised layer (``W = W2 W1``) contributes: ONE update on ``.second``
#: (r -> out), merged exactly into ``W2``; as many units as the dense model had, and only the
#: r-wide input of ``.second`` kept for backward. A pattern that matches a factor but not the
#: layer (``r".*qkv\.(first|second)"``) selects that factor.
LOWRANK_FACTOR = "second"

#: Default targets of a timm model when ``target_modules`` is None: fused ``qkv`` or separate
#: ``q``/``k``/``v``, the attention projection and the MLP of every block.
DEFAULT_TARGETS = r"(.*\.)?(qkv|q|k|v|attn\.proj|mlp\.fc1|mlp\.fc2)"

Patterns = str | Sequence[str] | None


def model_family(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model, else ``"timm"``."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or "timm")


def peft_default_targets(model_type: str) -> str | list[str] | None:
    """PEFT's own default ``target_modules`` for a transformers ``model_type``
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), or None when PEFT has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

    found = M.get(model_type)
    return list(found) if isinstance(found, (list, tuple, set)) else found


_INDEX = re.compile(r"(?:^|\.)\d+\.")  # a ModuleList / Sequential index inside a name


def block_linears(model: nn.Module) -> dict[str, str]:
    """``{name: kind}`` of the linear layers inside the model's repeated (Transformer) blocks.

    A block linear has a list index in its name (``encoder.layer.3.attention.self.query``,
    ``model.layers.0.mlp.up_proj``, ``blocks.2.attn.qkv``); its kind is the name after the last
    index (``attention.self.query``). Heads, poolers and embeddings are not block linears.
    A factorised layer (``.first`` / ``.second``) counts once, under its own name.
    """
    inner = _inside_adapters(model)
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not name or name in inner or name.rpartition(".")[0] in out:
            continue
        if not (_as_linear(mod) or _is_factorised(mod)):
            continue
        ends = [m.end() for m in _INDEX.finditer(name)]
        if ends:
            out[name] = name[ends[-1]:]
    return out


def default_targets(model: nn.Module) -> str | list[str]:
    """The default ``target_modules`` for ``model``, the same for every method.

    * a timm model: :data:`DEFAULT_TARGETS`;
    * a transformers model whose ``config.model_type`` PEFT knows: PEFT's own default
      (:func:`peft_default_targets`, e.g. ``["q_proj", "v_proj"]`` for Llama, ``["query",
      "value"]`` for BERT); :func:`select_linears` warns which block linears it leaves out;
    * another transformers model (ViT, CLIP, DINOv2...): every linear of its Transformer blocks
      (:func:`block_linears`), as a regex over their kinds; ``"all-linear"`` if it has none.
    """
    family = model_family(model)
    if family == "timm":
        return DEFAULT_TARGETS
    found = peft_default_targets(family)
    if found:
        return found
    kinds = sorted(set(block_linears(model).values()))
    if not kinds:
        return ALL_LINEAR
    return r"(.*\.)?\d+\.(" + "|".join(re.escape(k) for k in kinds) + ")"


def warn_partial_coverage(model: nn.Module, selected: Iterable[str], patterns: Patterns,
                          stacklevel: int = 3) -> list[str]:
    """One warning when ``selected`` covers some, not all, of the model's block linears
    (:func:`block_linears`): it names the kinds left out. Returns those kinds."""
    blocks = block_linears(model)
    chosen = {n.rpartition(".")[0] if n.rpartition(".")[0] in blocks else n for n in selected}
    hit = [n for n in blocks if n in chosen]
    missed = [n for n in blocks if n not in chosen]
    if not hit or not missed:
        return []
    kinds = list(dict.fromkeys(blocks[n] for n in missed))
    family = model_family(model)
    origin = (f"target_modules={patterns!r}" if patterns is not None else "the default targets"
              if family == "timm" else f"PEFT's default target_modules for {family!r}")
    warnings.warn(
        f"{origin} covers {len(hit)} of the {len(blocks)} Transformer-block linears of this "
        f"{type(model).__name__}; not adapted: {', '.join(kinds)} ({len(missed)} "
        f"layer{'s' * (len(missed) > 1)}); name them in target_modules to adapt them too",
        UserWarning, stacklevel=stacklevel)
    return kinds


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


def closest_names(patterns: Patterns, names: list[str], n: int = 3) -> list[str]:
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
                   modules_to_save: Patterns = None, warn: bool = True,
                   what: str = "target_modules") -> list[str]:
    """Qualified names of the linear layers ``patterns`` select, in model order.

    Args:
        model: any module (timm, transformers, trimtune-compressed).
        patterns: PEFT's ``target_modules`` (see the module docstring); ``None``: the model
            family's default (:func:`default_targets`).
        exclude: PEFT's ``exclude_modules``.
        modules_to_save: never targets (PEFT: adapters never wrap a module to save).
        warn: warn (once, :func:`warn_partial_coverage`) when the selection covers only part
            of the model's Transformer-block linears.
        what: the argument's name in the error (``"include"`` for ``trimtune.compress``).

    Raises:
        TrimtuneError: nothing matches; the message names the closest module names.
    """
    given = patterns
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
            f"{what}={patterns!r} match{'es' * (what != 'target_modules')} no linear layer of "
            f"this {type(model).__name__} "
            f"(PEFT's rule: a string is a regex over the whole name, a list holds names or name "
            f"suffixes); closest module names: {', '.join(closest_names(patterns, linears))}")
    if warn:
        warn_partial_coverage(model, found, given)
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
                            f"{', '.join(closest_names(missing, names))} (timm: "
                            "model.default_cfg['classifier'], transformers: 'classifier')")
    return hit


__all__ = ["ALL_LINEAR", "DEFAULT_TARGETS", "block_linears", "closest_names", "default_targets",
           "matches", "model_family", "peft_default_targets", "select_linears", "select_modules",
           "warn_partial_coverage"]
