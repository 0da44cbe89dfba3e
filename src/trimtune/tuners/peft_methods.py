"""LoRA, DoRA and AdaLoRA: PEFT's own layers, not re-written.

``lora``: PEFT LoRA on the target linears (+ head); ``dora``: PEFT DoRA
(``LoraConfig(use_dora=True)``); ``adalora``: PEFT AdaLoRA, with the returned callback.
Targets and the probe are :func:`trimtune.tuners.simple.prepare_method`'s. **The fused qkv stays
fused**: LoRA on it trains ``r * (d + 3d)`` numbers per block, whereas LoRA on split q, k, v
(the SNELL authors' layout) trains ``3 * r * 2d``; a factorised target gets one adapter on
``.second`` (``r * (rank + out)`` numbers).

The PEFT layers are injected in place with :func:`peft.inject_adapter_in_model` (AdaLoRA: its
tuner class, kept inside the returned callback): the model stays a plain ``nn.Module``, never a
``PeftModel``. The head is made trainable directly (no ``ModulesToSaveWrapper`` copy).

AdaLoRA's orthogonality regulariser lives in ``PeftModel.forward`` in PEFT; with a plain model
add :func:`adalora_orth_loss` to the objective's loss if you want it (the default objective
does not).

A run is saved by PEFT's rules (:func:`save_peft_adapter`, the one writer of
:mod:`.peft_folder`): ``PeftModel.from_pretrained(<the same base>, folder)`` opens it, the
modules trained in full (the head) as PEFT's ``modules_to_save``. AdaLoRA is saved unpruned
(``rank_pattern`` left out: the budget's masked ``lora_E`` entries are zeros in the tensors).
:func:`load_peft_tensors` reads such a folder back onto a model the method is attached to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..checkpoint import read_safetensors
from ..errors import TrimtuneError
from ..models.probe import Probe, route_through_modules
from .adapters import adapter_configs
from .peft_folder import PEFT_PREFIX, WEIGHTS_NAME, write_peft_folder
from .registry import refuse_rank
from .simple import (_train_modules, baseline_options, probe_or_undo, register_baseline,
                     target_linears)
from .targets import select_linears

__all__ = ["AdaLoraCallback", "adalora_orth_loss", "attach_peft_config", "load_peft_tensors",
           "lora_config", "save_peft_adapter"]

_ADALORA_PLACEHOLDER_STEPS = 10**9  # replaced by the real total at train start


def _train_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


# ---------------------------------------------------------------------------- LoRA, DoRA
def _setup_lora(model: nn.Module, *, method: str, adapted: list[str], r: int,
                alpha: float | None, modules_to_save: Sequence[str], kw: dict,
                **_: Any) -> list:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r,
                        lora_dropout=kw.pop("dropout", 0.0), target_modules=adapted,
                        use_dora=method == "dora", bias="none")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    _train_adapters(model)
    _train_modules(model, modules_to_save)
    return []


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
    probe_or_undo(model, adapted, probe, method, was_trainable)
    return model, []


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


def _setup_adalora(model: nn.Module, *, adapted: list[str], r: int, alpha: float | None,
                   modules_to_save: Sequence[str], kw: dict, record: dict, **_: Any) -> list:
    record["init_r"] = kw.get("init_r", math.ceil(1.5 * r))
    callback = _prepare_adalora(model, r, alpha, adapted, kw)
    _train_modules(model, modules_to_save)
    return [callback]


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


# ---------------------------------------------------------------------------- save / load
def lora_config(model: nn.Module, adapter_name: str = "default") -> Any | None:
    """The LoRA / DoRA / AdaLoRA config attached to ``model`` (None: another method)."""
    cfg = adapter_configs(model).get(adapter_name)
    return cfg if isinstance(cfg, (LoraConfig, AdaLoraConfig)) else None


def _trained_in_full(model: nn.Module) -> list[str]:
    """The modules PEFT must keep whole (its ``modules_to_save``): those owning a trained
    parameter or a saved buffer outside the PEFT layers (the head; normalisation
    statistics): what trimtune's own format kept of them."""
    tuner = [n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()} & set(model.state_dict())
    owners = {n.rpartition(".")[0] for n in names if not any(n.startswith(t) for t in tuner)}
    return sorted(owners)


def save_peft_adapter(model: nn.Module, path: str | Path, metadata: dict[str, str],
                      adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Write the LoRA / DoRA / AdaLoRA adapter of ``model`` as PEFT writes it, the modules
    trained in full as its ``modules_to_save``; returns the tensors written."""
    cfg = lora_config(model, adapter_name)
    if cfg is None:
        raise TrimtuneError("this model has no LoRA / DoRA / AdaLoRA adapter to save")
    # AdaLoRA's allocated rank_pattern would make PEFT prune through its tuner (not kept on a
    # plain model) and rewrite the live pattern's keys: saved unpruned, the pattern left as is
    pattern = getattr(cfg, "rank_pattern", None)
    if isinstance(cfg, AdaLoraConfig):
        cfg.rank_pattern = None
    try:
        state = get_peft_model_state_dict(model, adapter_name=adapter_name,
                                          save_embedding_layers=False)
    finally:
        if isinstance(cfg, AdaLoraConfig):
            cfg.rank_pattern = pattern
    full = _trained_in_full(model)
    own = model.state_dict()
    state.update({k: v for k, v in own.items() if k.rpartition(".")[0] in full})
    state = {k: v.detach().clone() for k, v in state.items()}
    extra = {"rank_pattern": None} if isinstance(cfg, AdaLoraConfig) else {}
    write_peft_folder(path, state, cfg, metadata, modules_to_save=full or None, **extra)
    return state


def load_peft_tensors(model: nn.Module, path: str | Path, adapter_name: str = "default"
                      ) -> nn.Module:
    """Load a folder written by :func:`save_peft_adapter` onto ``model``, which has the same
    method attached (in place): PEFT's own key rule for the adapter, the modules kept whole
    under their own names.

    Raises:
        TrimtuneError: tensors the model does not have, or trained tensors the folder lacks.
    """
    path = Path(path)
    tensors = {k.removeprefix(PEFT_PREFIX): v
               for k, v in read_safetensors(path / WEIGHTS_NAME).items()}
    own = model.state_dict()
    whole = {k: v for k, v in tensors.items() if k in own}
    result = set_peft_model_state_dict(
        model, {k: v for k, v in tensors.items() if k not in own}, adapter_name=adapter_name)
    model.load_state_dict(whole, strict=False)
    unexpected = list(result.unexpected_keys)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trained and k not in whole)
    if unexpected or missing:
        raise TrimtuneError(f"adapter {path} does not fit this model (unexpected tensors "
                            f"{unexpected[:3]}, trained tensors missing {missing[:3]}): load it "
                            "onto the base it was trained on")
    return model


# ---------------------------------------------------------------------------- the registry
def _adalora_options(cfg: Any, total_steps: int | None = None) -> dict[str, Any]:
    kw = baseline_options(cfg)
    if total_steps:
        kw["total_step"] = total_steps
    return kw


def check_rank(model: nn.Module, cfg: Any) -> None:
    """``cfg.r`` (AdaLoRA: its ``init_r``, default ``ceil(1.5 r)``) against every target."""
    layers = [(n, m.in_features, m.out_features) for n in
              select_linears(model, cfg.method_kwargs.get("target_modules", cfg.target_modules))
              for m in [model.get_submodule(n)]]
    rank = cfg.method_kwargs.get("init_r") or (
        math.ceil(1.5 * cfg.r) if cfg.method == "adalora" else cfg.r)
    refuse_rank(cfg, rank, layers)


def _is_lora(config: Any, dora: bool) -> bool:
    kind = str(getattr(getattr(config, "peft_type", None), "value", "")).lower()
    return kind == "lora" and bool(getattr(config, "use_dora", False)) == dora


register_baseline("lora", _setup_lora, options=("dropout",), check=check_rank,
                  attach_config=attach_peft_config,
                  holds="lora_A, lora_B of every target; the head",
                  config_class=LoraConfig,
                  owns_config=lambda c: _is_lora(c, dora=False))
register_baseline("dora", _setup_lora, options=("dropout",), check=check_rank,
                  attach_config=attach_peft_config,
                  holds="lora_A, lora_B and the magnitude vector of every target; the head",
                  config_class=LoraConfig,
                  owns_config=lambda c: _is_lora(c, dora=True))
register_baseline("adalora", _setup_adalora,
                  options=("dropout", "init_r", "total_step", "tinit", "tfinal", "deltaT",
                           "beta1", "beta2", "orth_reg_weight"),
                  check=check_rank, from_finetune=_adalora_options,
                  attach_config=attach_peft_config,
                  rebuild_options=("r", "alpha", "target_modules", "init_r"),
                  holds="lora_A, lora_E, lora_B and the rank mask of every target; the head",
                  config_class=AdaLoraConfig,
                  owns_config=lambda c: isinstance(c, AdaLoraConfig))
