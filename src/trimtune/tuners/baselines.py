"""Baseline fine-tuning methods that SNELL / SNELLA are compared against.

One verb, :func:`prepare_method`, turns a (plain or compressed) timm model into a model ready
for :func:`trimtune.train.fit` with one of these methods:

===============  ============================================================================
``full``         every parameter trains
``linear``       only ``modules_to_save`` (the classifier ``head``) trains: a linear probe
``bitfit``       every bias plus the head
``lora``         PEFT LoRA on the target linears (+ head)
``dora``         PEFT DoRA (``LoraConfig(use_dora=True)``) on the target linears (+ head)
``adalora``      PEFT AdaLoRA on the target linears (+ head); needs the returned callback
``masked-sparse`` the dense weights of the target linears train through a FIXED gradient mask
                 of a given density (SPT / GPS style memory reference, see below)
===============  ============================================================================

Target layers follow the one rule of :mod:`trimtune.tuners.targets` (PEFT's), with the same
default as SNELL: in every timm ViT block the fused ``attn.qkv``, the ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2`` linears. **The fused qkv stays fused**: LoRA on it
trains ``r * (d + 3d)`` numbers per block, whereas LoRA on split q, k, v (the SNELL authors'
layout) trains ``3 * r * 2d``. On a model compressed by :func:`trimtune.lowrank.compress`, a
target that became a low-rank pair gets ONE adapter, on its second factor ``.second``
(``r * (rank + out)`` numbers), as SNELL does; a pattern naming ``.first`` selects that factor.

The PEFT layers are injected in place with :func:`peft.inject_adapter_in_model` (AdaLoRA: its
tuner class, kept inside the returned callback): the model stays a plain ``nn.Module``, never a
``PeftModel``. The head is made trainable directly (no ``ModulesToSaveWrapper`` copy).
:func:`trimtune.tuners.registry.merge` (the one merge) folds the adapters back into plain
``nn.Linear`` layers.

AdaLoRA's orthogonality regulariser lives in ``PeftModel.forward`` in PEFT; with a plain model
add :func:`adalora_orth_loss` to the objective's loss if you want it (the default objective
does not).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import TrimtuneError, renamed
from ..models.probe import Probe, check_forward_path, route_through_modules
from .targets import select_linears, select_modules

__all__ = [
    "METHODS",
    "prepare_method",
    "attach_peft_config",
    "drop_method_state",
    "target_linears",
    "trainable_parameters",
    "AdaLoraCallback",
    "adalora_orth_loss",
]

METHODS = ("full", "linear", "bitfit", "lora", "dora", "adalora", "masked-sparse")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "full": (), "linear": (), "bitfit": (), "lora": ("dropout",), "dora": ("dropout",),
    "adalora": ("dropout", "init_r", "total_step", "tinit", "tfinal", "deltaT", "beta1",
                "beta2", "orth_reg_weight"),
    "masked-sparse": ("density", "sparsity", "batches", "loss_fn", "mask_init", "seed"),
}
_ADALORA_PLACEHOLDER_STEPS = 10**9  # replaced by the real total at train start


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
        method: one of :data:`METHODS`.
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
    if method not in METHODS:
        raise TrimtuneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(kw) - set(_OPTIONS[method])
    if unknown:
        raise TrimtuneError(f"method {method!r} does not take {sorted(unknown)}; it takes "
                            f"{list(_OPTIONS[method]) or 'no extra options'}")
    callbacks: list[Any] = []
    adapted = [] if method in ("full", "linear", "bitfit") else target_linears(
        model, target_modules, modules_to_save)
    # what rebuilds the same trainable tensors (trimtune.runs.load): JSON-able options only
    record = {"method": method, "r": r, "alpha": alpha,
              "target_modules": adapted or None}
    if method == "adalora":
        record["init_r"] = kw.get("init_r", math.ceil(1.5 * r))
    was_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapted:
        route_through_modules(model)
    if method == "full":
        model.requires_grad_(True)
    elif method in ("linear", "bitfit"):
        model.requires_grad_(False)
        if method == "bitfit":
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        _train_modules(model, modules_to_save)
    elif method in ("lora", "dora"):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r,
                            lora_dropout=kw.pop("dropout", 0.0), target_modules=adapted,
                            use_dora=method == "dora", bias="none")
        model.requires_grad_(False)
        inject_adapter_in_model(config, model)
        _train_adapters(model)
        _train_modules(model, modules_to_save)
    elif method == "adalora":
        callbacks.append(_prepare_adalora(model, r, alpha, adapted, kw))
        _train_modules(model, modules_to_save)
    else:
        _prepare_masked_sparse(model, adapted, kw)
        _train_modules(model, modules_to_save)
    model.trimtune_method = record
    _probe_or_undo(model, adapted, probe, method, was_trainable)
    return model, callbacks


def _probe_or_undo(model: nn.Module, adapted: list[str], probe: Probe, what: str,
                   was_trainable: set[str]) -> None:
    """The forward-path probe after a baseline is in; on failure the model is put back as it
    was (PEFT layers removed, masks dropped, ``requires_grad`` restored) and the error raised."""
    try:
        check_forward_path(model, adapted, probe, what=what)
    except TrimtuneError:
        _remove_peft_layers(model)
        drop_method_state(model)
        model.__dict__.pop("peft_config", None)  # PEFT's record of the injected adapter
        for n, p in model.named_parameters():
            p.requires_grad_(n in was_trainable)
        raise


def _train_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


# ---------------------------------------------------------------------------- AdaLoRA
def _prepare_adalora(model: nn.Module, rank: int, alpha: float | None,
                     target_modules: list[str], kw: dict) -> AdaLoraCallback:
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    targets = list(target_modules)
    total = kw.pop("total_step", None)
    config = AdaLoraConfig(
        init_r=kw.pop("init_r", math.ceil(1.5 * rank)), target_r=rank,
        lora_alpha=alpha if alpha is not None else rank, lora_dropout=kw.pop("dropout", 0.0),
        target_modules=targets, total_step=total or _ADALORA_PLACEHOLDER_STEPS,
        tinit=kw.pop("tinit", 0), tfinal=kw.pop("tfinal", 0), deltaT=kw.pop("deltaT", 1),
        beta1=kw.pop("beta1", 0.85), beta2=kw.pop("beta2", 0.85),
        orth_reg_weight=kw.pop("orth_reg_weight", 0.5))
    model.requires_grad_(False)
    # AdaLoRA keeps its rank allocator on the tuner object: build the tuner (it injects the
    # SVD layers into ``model`` in place) and keep it in the callback, not around the model.
    tuner = AdaLoraModel(model, config, "default")
    _train_adapters(model)
    return AdaLoraCallback(tuner, total_known=total is not None)


class AdaLoraCallback:
    """Training callback running AdaLoRA's ``update_and_allocate`` after each optimizer step.

    PEFT expects the 0-based index of the step just taken, after ``optimizer.step()`` and
    before ``zero_grad()``; the training loop calls ``after_optimizer_step`` there with
    ``state.step`` = steps done, so the index is ``state.step - 1``.
    """

    def __init__(self, tuner: nn.Module, total_known: bool = True) -> None:
        self.tuner = tuner
        self.total_known = total_known

    @property
    def config(self) -> Any:
        return self.tuner.peft_config["default"]

    def on_train_start(self, state: Any) -> None:
        if not self.total_known:
            total = getattr(state, "total_steps", None)
            if not total:
                raise TrimtuneError("AdaLoRA needs the number of training steps; pass "
                                    "total_step=... to prepare_method or train with fit()")
            cfg = self.config
            if cfg.tinit >= total - cfg.tfinal:
                raise TrimtuneError(f"AdaLoRA tinit={cfg.tinit} + tfinal={cfg.tfinal} leave no "
                                    f"budgeting phase in {total} steps; lower them")
            self.tuner.rankallocator.set_total_step(int(total))
            self.total_known = True

    def after_optimizer_step(self, state: Any) -> None:
        self.tuner.update_and_allocate(int(state.step) - 1)

    def state_dict(self) -> dict[str, Any]:
        ra = self.tuner.rankallocator
        return {"ipt": dict(ra.ipt), "exp_avg_ipt": dict(ra.exp_avg_ipt),
                "exp_avg_unc": dict(ra.exp_avg_unc), "rank_pattern": self.config.rank_pattern,
                "total_step": self.config.total_step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        ra = self.tuner.rankallocator
        ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc = (dict(d["ipt"]), dict(d["exp_avg_ipt"]),
                                                  dict(d["exp_avg_unc"]))
        self.config.rank_pattern = d["rank_pattern"]
        ra.set_total_step(int(d["total_step"]))
        self.total_known = True


def adalora_orth_loss(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser ``mean ||P P^T - I||_F`` over its ``lora_A`` and
    ``lora_B`` (as in ``AdaLoraModel.forward``); multiply by ``orth_reg_weight``."""
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=p.device)))
    if not terms:
        raise TrimtuneError("no AdaLoRA factors found; prepare the model with method='adalora'")
    return torch.stack(terms).mean()


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


# ---------------------------------------------------------------------------- merge
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


def _remove_peft_layers(model: nn.Module) -> None:
    """Replace every PEFT layer by its base layer (nothing merged), in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in [(n, m) for n, m in model.named_modules()
                        if isinstance(m, BaseTunerLayer)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                layer.get_base_layer())


def attach_peft_config(model: nn.Module, config: Any, modules_to_save: Sequence[str] = ("head",),
                       probe: Probe = True) -> tuple[nn.Module, list]:
    """LoRA / DoRA from a ready ``peft.LoraConfig`` (its ``target_modules`` selected by the
    one rule), the head trained in full and the forward path probed as :func:`prepare_method`
    does."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(config, LoraConfig) or type(config) is not LoraConfig:
        raise TrimtuneError(f"attach takes a peft.LoraConfig here, got {type(config).__name__}:"
                            " give AdaLoRA as method='adalora' with options")
    adapted = target_linears(model, config.target_modules, modules_to_save)
    config.target_modules = adapted
    was_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    route_through_modules(model)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    _train_adapters(model)
    _train_modules(model, modules_to_save)
    method = "dora" if config.use_dora else "lora"
    model.trimtune_method = {"method": method, "r": config.r, "alpha": config.lora_alpha,
                             "target_modules": adapted}
    _probe_or_undo(model, adapted, probe, method, was_trainable)
    return model, []
