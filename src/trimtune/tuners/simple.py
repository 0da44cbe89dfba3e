"""The simple fine-tuning methods, and the one way every baseline attaches.

===============  ============================================================================
``full``         every parameter trains
``linear``       only ``modules_to_save`` (the classifier ``head``) trains: a linear probe
``bitfit``       every bias plus the head
``masked-sparse`` the dense weights of the target linears train through a FIXED gradient mask
                 of a given density (SPT / GPS style memory reference, see below)
===============  ============================================================================

LoRA, DoRA and AdaLoRA (PEFT's own layers) are in :mod:`.peft_methods`; both modules register
their methods with :func:`register_baseline`, and one verb, :func:`prepare_method`, turns a
(plain or compressed) timm model into a model ready for :func:`trimtune.train.fit` with any of
them: it selects the targets, records what rebuilds the trained tensors
(``model.trimtune_method``), runs the method's set-up and the forward-path probe.

Target layers follow the one rule of :mod:`trimtune.tuners.targets` (PEFT's), with the same
default as SNELL: in every timm ViT block the fused ``attn.qkv``, the ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2`` linears. On a model compressed by :func:`trimtune.lowrank.compress`,
a target that became a low-rank pair is adapted on its second factor ``.second``, as SNELL does;
a pattern naming ``.first`` selects that factor. :func:`trimtune.tuners.registry.merge` (the
one merge) folds every method back into plain layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import TrimtuneError, renamed
from ..models.probe import Probe, check_forward_path, route_through_modules
from .adapters import drop_method_state, remove_peft_layers
from .registry import Method, register_method
from .targets import select_linears, select_modules

__all__ = [
    "prepare_method",
    "register_baseline",
    "target_linears",
    "trainable_parameters",
]

#: ``(model, method=, adapted=, r=, alpha=, modules_to_save=, kw=, record=) -> callbacks``
Setup = Callable[..., list]
#: method -> (its set-up, the extra options it takes, whether it adapts target linears)
_BASELINES: dict[str, tuple[Setup, tuple[str, ...], bool]] = {}


def target_linears(model: nn.Module, target_modules: str | Sequence[str] | None = None,
                   modules_to_save: Sequence[str] = ("head",)) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers a method adapts: the one rule of
    :func:`trimtune.tuners.targets.select_linears` (PEFT's; ``None``: the model family's
    default; a matched low-rank layer contributes ``name.second``; modules trained in full are
    never targets)."""
    return select_linears(model, target_modules, modules_to_save=list(modules_to_save or ()))


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter entries with ``requires_grad`` (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _train_modules(model: nn.Module, modules_to_save: Iterable[str]) -> None:
    """Make every parameter of the named modules trainable (:func:`select_modules`)."""
    for name in select_modules(model, list(modules_to_save or ())):
        model.get_submodule(name).requires_grad_(True)


@renamed(rank="r")
def prepare_method(model: nn.Module, method: str, *, r: int = 8, alpha: float | None = None,
                   target_modules: str | Sequence[str] | None = None,
                   modules_to_save: Sequence[str] = ("head",), probe: Probe = True,
                   **kw: Any) -> tuple[nn.Module, list[Any]]:
    """Set ``model`` up (in place) for fine-tuning with a baseline ``method``.

    Args:
        model: a plain or compressed timm model.
        method: a registered method other than SNELL / SNELLA (LoRA, DoRA, AdaLoRA:
            :mod:`.peft_methods`; full, linear, bitfit, masked-sparse: here).
        r: LoRA / DoRA rank; AdaLoRA's *target* average rank (``init_r`` defaults to
            ``ceil(1.5 * r)``). ``rank=``: the old spelling (DeprecationWarning).
        alpha: LoRA scaling numerator (``lora_alpha``); default ``r`` (scale 1).
        target_modules: which linears to adapt, see :func:`target_linears`.
        modules_to_save: modules trained in full besides the adapters (default the head).
        probe: after the adapters are in, a probe forward / backward proves every adapted
            layer is called and every adapter parameter reached by the gradient, else a
            TrimtuneError names the layer and the model is put back as it was
            (:func:`trimtune.models.probe.check_forward_path`): True builds a random batch
            from the model, an example input is used as given, False skips the check.
        **kw: per method:
            ``dropout`` (lora/dora/adalora, default 0);
            adalora: ``init_r``, ``total_step`` (default: ``state.total_steps`` at train
            start), ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``;
            masked-sparse: ``density`` (fraction of entries that train, default 0.3;
            ``sparsity=`` = 1 - density is the old spelling, a DeprecationWarning),
            ``batches`` (iterable of ``(images, labels)``),
            ``loss_fn`` (default cross-entropy), ``mask_init`` ("gradient" | "magnitude" |
            "random"), ``seed``.

    Returns:
        ``(model, callbacks)``: the same model object, and the training callbacks the method
        needs (only AdaLoRA has one).
    """
    if method not in _BASELINES:
        raise TrimtuneError(f"unknown method {method!r}; choose one of {', '.join(_BASELINES)}")
    setup, options, adapts = _BASELINES[method]
    unknown = set(kw) - set(options)
    if unknown:
        raise TrimtuneError(f"method {method!r} does not take {sorted(unknown)}; it takes "
                            f"{list(options) or 'no extra options'}")
    adapted = target_linears(model, target_modules, modules_to_save) if adapts else []
    # what rebuilds the same trainable tensors (trimtune.runs.load): JSON-able options only
    record = {"method": method, "r": r, "alpha": alpha,
              "target_modules": adapted or None}
    was_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapted:
        route_through_modules(model)
    callbacks = setup(model, method=method, adapted=adapted, r=r, alpha=alpha,
                      modules_to_save=modules_to_save, kw=kw, record=record)
    model.trimtune_method = record
    probe_or_undo(model, adapted, probe, method, was_trainable)
    return model, callbacks


def probe_or_undo(model: nn.Module, adapted: list[str], probe: Probe, what: str,
                   was_trainable: set[str]) -> None:
    """The forward-path probe after a baseline is in; on failure the model is put back as it
    was (PEFT layers removed, masks dropped, ``requires_grad`` restored) and the error raised."""
    try:
        check_forward_path(model, adapted, probe, what=what)
    except TrimtuneError:
        remove_peft_layers(model)
        drop_method_state(model)
        model.__dict__.pop("peft_config", None)  # PEFT's record of the injected adapter
        for n, p in model.named_parameters():
            p.requires_grad_(n in was_trainable)
        raise


def baseline_options(cfg: Any, total_steps: int | None = None) -> dict[str, Any]:
    """:func:`prepare_method`'s options for a run (a
    :class:`~trimtune.finetune_config.FinetuneConfig`): ``r``, the targets and
    ``method_kwargs``."""
    return {"r": cfg.r, "target_modules": cfg.target_modules, **cfg.method_kwargs}


def register_baseline(name: str, setup: Setup, *, options: tuple[str, ...] = (),
                      adapts: bool = True, holds: str, attach_config: Callable | None = None,
                      **fields: Any) -> Method:
    """Register a baseline: its set-up (what :func:`prepare_method` runs for it), the extra
    options it takes, whether it adapts target linears, what its adapter holds, how it attaches
    from a config object (``attach_config(model, config, probe=)``; None: options only); ``fields``:
    the rest of its :class:`~trimtune.tuners.registry.Method` (``config_class``,
    ``from_finetune``, ``check``, ``rebuild_options``, ``owns_config``, ``callbacks``)."""
    _BASELINES[name] = (setup, options, adapts)
    fields.setdefault("config_class", None)
    fields.setdefault("from_finetune", baseline_options)
    fields.setdefault("rebuild_options", ("r", "alpha", "target_modules") if adapts else ())
    return register_method(Method(name=name, holds=holds, peft=False,
                                  attach=_registry_attach(name, attach_config), **fields))


def _registry_attach(name: str, attach_config: Callable | None):
    def attach(model: nn.Module, config: Any = None, *, probe: Probe = True,
               **options: Any) -> tuple[nn.Module, list]:
        if config is not None:
            if attach_config is None:
                raise TrimtuneError(f"method {name!r} takes keyword options, not a "
                                    f"{type(config).__name__}")
            return attach_config(model, config, probe=probe, **options)
        return prepare_method(model, name, probe=probe, **options)

    return attach


# ---------------------------------------------------------------------------- full, linear, bitfit
def _setup_full(model: nn.Module, **_: Any) -> list:
    model.requires_grad_(True)
    return []


def _setup_head(model: nn.Module, *, method: str, modules_to_save: Sequence[str],
                **_: Any) -> list:
    """linear: the head only; bitfit: every bias too."""
    model.requires_grad_(False)
    if method == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    _train_modules(model, modules_to_save)
    return []


# ---------------------------------------------------------------------------- masked sparse
def _prepare_masked_sparse(model: nn.Module, target_modules: list[str], kw: dict) -> None:
    """Dense target weights train through a fixed gradient mask (SPT / GPS memory reference).

    The mask keeps ``density`` of the entries of every target weight (per layer, like SNELL's
    per-layer sparsity). Entries are picked by the largest accumulated ``|grad|`` over
    ``batches`` (SPT/GPS-style, default when batches are given), else by the largest
    ``|weight|`` ("magnitude", default without batches) or at random ("random", seeded).
    The mask is a non-persistent buffer ``trimtune_grad_mask`` on the layer, applied by a
    ``register_hook`` on the weight, so the whole matrix still sits in the optimizer: the
    memory cost of SPT/GPS. Biases of target layers stay frozen. Decoupled weight decay
    (AdamW) still moves masked-out entries: use ``weight_decay=0`` for exact sparsity.
    """
    density = kw.pop("density", None)
    sparsity = kw.pop("sparsity", None)
    if sparsity is not None:
        if density is not None:
            raise TrimtuneError(f"masked-sparse: density={density} and sparsity={sparsity} both "
                                "given; sparsity is the old spelling of 1 - density: pass "
                                "density only")
        warnings.warn(f"masked-sparse: sparsity={sparsity} is deprecated, use density="
                      f"{1.0 - sparsity:g} (the fraction of each weight that trains)",
                      DeprecationWarning, stacklevel=4)
        density = 1.0 - sparsity
    if density is None:
        density = 0.3
    if not 0.0 < density <= 1.0:
        raise TrimtuneError(f"masked-sparse density={density} must be in (0, 1]; e.g. "
                            "density=0.3")
    batches = kw.pop("batches", None)
    loss_fn: Callable = kw.pop("loss_fn", nn.functional.cross_entropy)
    mask_init = kw.pop("mask_init", None) or ("gradient" if batches is not None else "magnitude")
    seed = kw.pop("seed", 0)
    if mask_init not in ("gradient", "magnitude", "random"):
        raise TrimtuneError(f"mask_init={mask_init!r} unknown; use gradient, magnitude or random")
    if mask_init == "gradient" and batches is None:
        raise TrimtuneError("mask_init='gradient' needs batches=[(images, labels), ...]")

    names = list(target_modules)
    layers = {n: model.get_submodule(n) for n in names}
    model.requires_grad_(False)
    if mask_init == "gradient":
        scores = _gradient_scores(model, layers, batches, loss_fn)
    elif mask_init == "magnitude":
        scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    else:
        g = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(m.weight.shape, generator=g) for n, m in layers.items()}
    for n, layer in layers.items():
        w = layer.weight
        k = max(1, round(density * w.numel()))
        mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        mask[scores[n].flatten().topk(k).indices.to(w.device)] = 1
        layer.register_buffer("trimtune_grad_mask", mask.view_as(w), persistent=False)
        w.requires_grad_(True)
        layer._trimtune_mask_hook = w.register_hook(
            lambda grad, layer=layer: grad * layer.trimtune_grad_mask)


def _gradient_scores(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                     loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Accumulated ``|dL/dW|`` of each target weight over ``batches``; grads left cleared."""
    scores = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for m in layers.values():
        m.weight.requires_grad_(True)
    device = next(model.parameters()).device
    n_batches = 0
    for x, y in batches:
        loss = loss_fn(model(x.to(device)), y.to(device))
        grads = torch.autograd.grad(loss, [m.weight for m in layers.values()])
        for n, g in zip(layers, grads):
            scores[n] += g.abs()
        n_batches += 1
    if n_batches == 0:
        raise TrimtuneError("batches is empty; give a few (images, labels) batches or "
                            "mask_init='magnitude'")
    for m in layers.values():
        m.weight.requires_grad_(False)
    return scores


def _setup_masked_sparse(model: nn.Module, *, adapted: list[str], kw: dict,
                         modules_to_save: Sequence[str], **_: Any) -> list:
    _prepare_masked_sparse(model, adapted, kw)
    _train_modules(model, modules_to_save)
    return []


def _masked_sparse_options(cfg: Any, total_steps: int | None = None) -> dict[str, Any]:
    return {**baseline_options(cfg),
            "density": cfg.density if cfg.density is not None else 1.0 - cfg.target_sparsity}


register_baseline("full", _setup_full, adapts=False, holds="every trained tensor")
register_baseline("linear", _setup_head, adapts=False, holds="the head")
register_baseline("bitfit", _setup_head, adapts=False, holds="every bias and the head")
register_baseline("masked-sparse", _setup_masked_sparse,
                  options=("density", "sparsity", "batches", "loss_fn", "mask_init", "seed"),
                  holds="the masked target weights and the head",
                  from_finetune=_masked_sparse_options, rebuild_options=("target_modules",))
