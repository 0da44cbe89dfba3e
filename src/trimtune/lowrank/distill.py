"""PELA step 2: distil a low-rank student from its frozen original (teacher).

The objective plugs into the one training loop (``trimtune.train.fit``)::

    student = compress(teacher, ratio=2.0)
    cfg = DistillConfig(train=TrainConfig(epochs=1, lr=1e-4), reg_weight=1.0)
    set_trainable(student, cfg.trainable)
    fit(student, images, cfg.objective(teacher), cfg.train)

Loss (each term weighted, zero-weight terms are not computed)::

    block  = mean_b MSE(student block b tokens, teacher block b tokens)   (B, N, C), prefix incl.
    final  = MSE(student forward_features, teacher forward_features)       (B, N, C)
    (feature_norm="layernorm": both sides' tokens normalised to zero mean and unit variance
    over C first, so every block counts alike and the few large-norm tokens and channels of a
    late ViT block do not dominate; the authors compare raw features, "none", the default)
    logits = MSE(z_s, z_t)  or  T^2 KL(softmax(z_t/T) || softmax(z_s/T))   (B, K)
    ce     = cross_entropy(z_s, y) over labelled samples (y >= 0)
    reg    = mean_l (max_ij |W2 W1 - W_teacher|_ij - eps)^2                (authors' form)

One student forward per step. A timm model: ``forward_intermediates(intermediates_only=False)``
gives the block outputs and the final features, then ``forward_head`` the logits. A Hugging Face
transformers model: ``model(**inputs, output_hidden_states=True)`` gives the block outputs
(``hidden_states[1:]``), the final features (``last_hidden_state``, else the last block) and the
logits (``logits``, when the model has a head); token terms skip padding (``attention_mask``).
This module does not import ``trimtune.train``: the objective is a plain callable.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TrimtuneError
from ..models import is_transformers_model
from .compress import factorised_layers
from .layers import LowRankLinear

if TYPE_CHECKING:
    from ..train import TrainConfig

__all__ = ["DistillConfig", "DistillObjective", "set_trainable", "teacher_weights",
           "weight_perturbation"]


# ---- weight-perturbation regulariser ---------------------------------------------------------
def teacher_weights(teacher: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{layer name: detached teacher weight (out, in)}`` for the student's factorised layers."""
    out = {}
    for name in names:
        try:
            m = teacher.get_submodule(name)
        except AttributeError as e:
            raise TrimtuneError(f"teacher has no layer {name!r}: pass the original model the "
                                f"student was compressed from") from e
        w = m.weight_product if isinstance(m, LowRankLinear) else m.weight
        out[name] = w.detach()
    return out


def weight_perturbation(student: nn.Module, teacher_weights: dict[str, torch.Tensor],
                        eps: float = 0.0, form: Literal["max", "smooth"] = "max",
                        p: float = 8.0) -> torch.Tensor:
    """PELA's regulariser: ``mean_l (e_l - eps)^2`` over the student's factorised layers.

    ``e_l = max_ij |W2 W1 - W_teacher|`` (form="max", the authors'; only the arg-max element
    gets gradient) or the power mean ``(mean_ij |D|^p)^(1/p)`` (form="smooth", every element
    gets gradient, tends to the max as p grows). Gradients reach only the student's factors.

    Returns:
        A scalar tensor (0 if the student has no factorised layer).
    """
    if form not in ("max", "smooth"):
        raise TrimtuneError(f"reg_form={form!r}: use 'max' or 'smooth'")
    terms = []
    for name, layer in factorised_layers(student).items():
        if name not in teacher_weights:
            raise TrimtuneError(f"no teacher weight for factorised layer {name!r}: build "
                                f"teacher_weights from the original model of this student")
        w_t = teacher_weights[name].to(layer.second.weight.dtype)
        d = (layer.second.weight @ layer.first.weight - w_t).abs()  # (out, in)
        if form == "max":
            e = d.amax()
        else:  # power mean, scaled by the (detached) max for numerical safety
            m = d.amax().detach().clamp_min(1e-12)
            e = m * (d / m).pow(p).mean().pow(1.0 / p)
        terms.append((e - eps) ** 2)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


# ---- student / teacher features --------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def _forward_as(model: nn.Module, fn) -> Iterator[nn.Module]:
    """Temporarily route ``model(...)`` (through any DDP wrapper) to ``fn``."""
    inner = _unwrap(model)
    old = inner.__dict__.get("forward")  # Accelerate may have patched forward (autocast)
    inner.forward = fn
    try:
        yield inner
    finally:
        if old is None:
            del inner.forward
        else:
            inner.forward = old


def _pick(hidden: Sequence[torch.Tensor], blocks) -> list[torch.Tensor]:
    """The block outputs timm's ``indices`` would pick: None = all, n = last n, list = those."""
    if blocks is None:
        return list(hidden)
    if isinstance(blocks, int):
        return list(hidden[len(hidden) - blocks:])
    return [hidden[i] for i in blocks]


def _hf_features(model: nn.Module, forward, inputs: dict, blocks, need_logits: bool):
    """``(final, [block outputs], logits | None)`` of a transformers model, one forward."""
    out = forward(**inputs, output_hidden_states=True, return_dict=True)
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise TrimtuneError(f"{type(model).__name__} returned no hidden_states with "
                            "output_hidden_states=True: distil a transformers model that does")
    inter = _pick(hidden[1:], blocks)  # hidden_states[0]: the embeddings
    final = getattr(out, "last_hidden_state", None)
    final = hidden[-1] if final is None else final
    logits = getattr(out, "logits", None)
    if need_logits and logits is None:
        raise TrimtuneError(f"{type(model).__name__} has no logits (no head): set "
                            "logits_weight=0 and ce_weight=0 to distil its features only")
    return final, inter, logits


def _hf_inputs(model: nn.Module, x) -> dict:
    """A transformers model's keyword inputs: a dict as given, a tensor as its main input."""
    return dict(x) if isinstance(x, dict) else {model.main_input_name: x}


def _split_batch(batch):
    """``(inputs, labels | None)``: ``x``, ``(x, y)`` or a dict (``labels`` taken out)."""
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


FEATURE_NORMS = ("none", "layernorm")


def _check_feature_norm(norm: str) -> None:
    if norm not in FEATURE_NORMS:
        raise TrimtuneError(f"feature_norm={norm!r}: use 'none' (the authors) or 'layernorm'")


def _mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
         norm: str = "none") -> torch.Tensor:
    """MSE of token features (B, N, C), over the tokens where ``mask`` (B, N) is set;
    ``norm="layernorm"`` compares each token normalised over C (no affine) instead."""
    t = t.to(s.dtype)
    if norm == "layernorm":
        s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
    if mask is None or s.dim() != 3 or mask.shape != s.shape[:2]:
        return F.mse_loss(s, t)
    keep = mask.bool()
    return F.mse_loss(s[keep], t[keep])


def _intermediates(model: nn.Module, x: torch.Tensor, blocks, only: bool):
    """``(final (B, N, C) | None, [block outputs (B, N, C)])``; full token sequence, no norm."""
    if not hasattr(model, "forward_intermediates"):
        raise TrimtuneError(f"{type(model).__name__} has no forward_intermediates: use a timm "
                            f"model (timm >= 1.0) or a transformers model as student and teacher")
    params = inspect.signature(model.forward_intermediates).parameters
    kw: dict[str, Any] = {"indices": blocks, "intermediates_only": only}
    if "norm" in params:
        kw["norm"] = False
    if "return_prefix_tokens" in params:
        kw["return_prefix_tokens"] = True
    if "output_fmt" in params:
        kw["output_fmt"] = "NLC"
    try:
        out = model.forward_intermediates(x, **kw)
    except AssertionError:  # this family only supports NCHW: compare those maps instead
        kw.pop("output_fmt")
        out = model.forward_intermediates(x, **kw)
    final, inter = (None, out) if only else out
    inter = [torch.cat([y[1], y[0]], dim=1) if isinstance(y, tuple) else y for y in inter]
    return final, inter


class DistillObjective:
    """PELA distillation loss for :func:`trimtune.train.fit`: ``objective(student, batch)``.

    Args:
        teacher: the original model; frozen here (eval mode, ``requires_grad=False``) and kept
            as a plain attribute: never registered in the student, never prepared or wrapped in
            DDP, never in the optimizer. ``setup(accelerator)`` moves it to the device.
        block_weight: weight of the per-block feature MSE (authors: 1.0).
        final_weight: weight of the final-feature (``forward_features``) MSE.
        logits_weight: weight of the logits term; ``logits_loss`` "mse" or "kl" (T^2-scaled).
        ce_weight: weight of cross-entropy on labelled samples (``y >= 0``).
        reg_weight / reg_eps / reg_form / reg_p: the weight-perturbation regulariser.
        blocks: which blocks to distil (timm ``indices``: None = all, int = last n, or a list).
        feature_norm: "none" (authors: raw token features) or "layernorm" (each token of
            student and teacher normalised over its channels before the block / final MSE).

    A batch is ``x`` (B, 3, H, W), or ``(x, y)`` with ``y = -1`` for unlabelled images. For a
    transformers model ``x`` is its main input (``pixel_values`` / ``input_ids``) or a dict of
    its inputs (``{"input_ids", "attention_mask"}``, optional ``"labels"``): features come from
    ``output_hidden_states`` and padded tokens are left out of the token terms.
    """

    def __init__(self, teacher: nn.Module, *, block_weight: float = 1.0, final_weight: float = 0.0,
                 logits_weight: float = 0.0, logits_loss: Literal["mse", "kl"] = "mse",
                 temperature: float = 1.0, ce_weight: float = 1.0, reg_weight: float = 0.0,
                 reg_eps: float = 0.0, reg_form: Literal["max", "smooth"] = "max",
                 reg_p: float = 8.0, blocks: int | Sequence[int] | None = None,
                 feature_norm: Literal["none", "layernorm"] = "none") -> None:
        _check_feature_norm(feature_norm)
        if logits_loss not in ("mse", "kl"):
            raise TrimtuneError(f"logits_loss={logits_loss!r}: use 'mse' or 'kl'")
        if reg_form not in ("max", "smooth"):
            raise TrimtuneError(f"reg_form={reg_form!r}: use 'max' or 'smooth'")
        if temperature <= 0:
            raise TrimtuneError(f"temperature={temperature}: use a positive temperature")
        self.teacher = teacher.eval().requires_grad_(False)
        self.block_weight, self.final_weight, self.logits_weight = block_weight, final_weight, \
            logits_weight
        self.logits_loss, self.temperature, self.ce_weight = logits_loss, temperature, ce_weight
        self.reg_weight, self.reg_eps, self.reg_form, self.reg_p = reg_weight, reg_eps, reg_form, \
            reg_p
        self.blocks, self.feature_norm = blocks, feature_norm
        self._w_teacher: dict[str, torch.Tensor] | None = None
        # Without a logits/ce term the head never gets gradient: DDP must allow unused params.
        self.find_unused_parameters = not (logits_weight or ce_weight)

    def setup(self, accelerator) -> None:
        """Called once by the loop: move the frozen teacher to the training device."""
        self.teacher.to(accelerator.device)
        self._w_teacher = None

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = _split_batch(batch)
        inner = _unwrap(model)
        hf = is_transformers_model(inner)
        if hf != is_transformers_model(self.teacher):
            raise TrimtuneError("student and teacher are of different libraries (timm vs "
                                "transformers): distil from the model the student was "
                                "compressed from")
        mask = None
        if hf:
            x = _hf_inputs(inner, x)
            mask = x.get("attention_mask")
        need_logits = bool(self.logits_weight or (self.ce_weight and y is not None))
        with torch.no_grad():
            self.teacher.eval()
            if hf:
                t_final, t_blocks, t_logits = _hf_features(
                    self.teacher, self.teacher, x, self.blocks, bool(self.logits_weight))
            else:
                need_t_final = bool(self.final_weight or self.logits_weight)
                t_final, t_blocks = _intermediates(self.teacher, x, self.blocks,
                                                   only=not need_t_final)
                t_logits = self.teacher.forward_head(t_final) if self.logits_weight else None

        forward = inner.forward  # the model's own (or Accelerate's autocast) forward

        def student_forward(inp):  # ONE student forward: block outputs, features and logits
            if hf:
                return _hf_features(inner, forward, inp, self.blocks, need_logits)
            final, inter = _intermediates(inner, inp, self.blocks, only=False)
            return final, inter, inner.forward_head(final)

        with _forward_as(model, student_forward):
            s_final, s_blocks, s_logits = model(x)

        logs: dict[str, torch.Tensor] = {}
        if self.block_weight:
            if len(s_blocks) != len(t_blocks):
                raise TrimtuneError(f"student has {len(s_blocks)} blocks, teacher {len(t_blocks)}"
                                    f": distil from the model the student was compressed from")
            logs["block"] = torch.stack([_mse(s, t, mask, self.feature_norm)
                                         for s, t in zip(s_blocks, t_blocks)]).mean()
        if self.final_weight:
            logs["final"] = _mse(s_final, t_final, mask, self.feature_norm)
        if self.logits_weight:
            logs["logits"] = self._logits_term(s_logits, t_logits)
        if self.ce_weight and y is not None and (y >= 0).any():
            logs["ce"] = F.cross_entropy(s_logits[y >= 0], y[y >= 0])
        if self.reg_weight:
            inner_student = _unwrap(model)
            if self._w_teacher is None:
                self._w_teacher = teacher_weights(self.teacher,
                                                  list(factorised_layers(inner_student)))
            logs["reg"] = weight_perturbation(inner_student, self._w_teacher, self.reg_eps,
                                              self.reg_form, self.reg_p)
        weights = {"block": self.block_weight, "final": self.final_weight,
                   "logits": self.logits_weight, "ce": self.ce_weight, "reg": self.reg_weight}
        if not logs:
            raise TrimtuneError("every distillation term is off (all weights 0, no labels): set "
                                "block_weight=1.0 or another weight")
        loss = sum(weights[k] * v for k, v in logs.items())
        return loss, {k: v.detach() for k, v in logs.items()}

    def _logits_term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.logits_loss == "mse":
            return F.mse_loss(s, t.to(s.dtype))
        T = self.temperature
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t.to(s.dtype) / T, -1),
                        log_target=True, reduction="batchmean") * T * T


# ---- configuration ---------------------------------------------------------------------------
def set_trainable(student: nn.Module, trainable: Literal["all", "factors"] = "all") -> nn.Module:
    """Choose what learns: "all" student parameters (the authors) or only the low-rank factors."""
    if trainable not in ("all", "factors"):
        raise TrimtuneError(f"trainable={trainable!r}: use 'all' or 'factors'")
    student.requires_grad_(trainable == "all")
    if trainable == "factors":
        layers = factorised_layers(student)
        if not layers:
            raise TrimtuneError("trainable='factors' but the student has no factorised layer: "
                                "compress it first (trimtune.lowrank.compress)")
        for layer in layers.values():
            layer.requires_grad_(True)
    return student


@dataclass
class DistillConfig:
    """Distillation settings, composed: the loop's ``TrainConfig`` plus the objective's weights.

    ``train=None`` means ``TrainConfig()`` defaults (the caller builds it: this module does not
    import ``trimtune.train``). ``trainable``: "all" student params (authors) or "factors".
    Build the objective with :meth:`objective`, set what learns with :func:`set_trainable`.
    """

    train: TrainConfig | None = None
    block_weight: float = 1.0
    final_weight: float = 0.0
    logits_weight: float = 0.0
    logits_loss: Literal["mse", "kl"] = "mse"
    temperature: float = 1.0
    ce_weight: float = 1.0
    reg_weight: float = 0.0
    reg_eps: float = 0.0
    reg_form: Literal["max", "smooth"] = "max"
    reg_p: float = 8.0
    blocks: int | list[int] | None = None
    feature_norm: Literal["none", "layernorm"] = "none"
    trainable: Literal["all", "factors"] = "all"

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "factors"):
            raise TrimtuneError(f"trainable={self.trainable!r}: use 'all' or 'factors'")
        _check_feature_norm(self.feature_norm)

    def objective(self, teacher: nn.Module) -> DistillObjective:
        kw = {f.name: getattr(self, f.name) for f in fields(self)
              if f.name not in ("train", "trainable")}
        return DistillObjective(teacher, **kw)
