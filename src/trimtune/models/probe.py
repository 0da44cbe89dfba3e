"""Forward-path proof: is every layer that trimtune replaced really used by the model?

``attach`` (SNELL / SNELLA), ``prepare_method`` (LoRA & co.) and ``compress`` swap modules in
place. A model that reads a layer's weight directly instead of calling it (timm's EVA attention
does ``F.linear(x, self.qkv.weight, qkv_bias)``) would silently bypass the replacement: its
adapter never trains and merging folds an untrained update into the weights, or a factorised
layer crashes on ``.weight``. :func:`check_forward_path` runs one probe forward / backward on a
tiny batch and raises one :class:`~trimtune.errors.TrimtuneError` naming the module and why.

:func:`route_through_modules` first switches known direct-weight patterns to their own
equivalent module-call path (EVA: ``qkv_bias_separate=True``, i.e. ``self.qkv(x) + bias``), so
those models work instead of failing.

The ``probe`` argument the verbs take:

* ``True`` (default): build a batch of one random input from the model (a timm data config:
  ``pretrained_cfg`` / ``patch_embed.img_size``; a transformers model: ``main_input_name`` and
  its config). When no input can be built, a warning says the check was skipped.
* a tensor, tuple (positional args) or dict (keyword args): the model's example input.
* ``False``: no check (models where no input can be built and you accept the risk).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import TrimtuneError

__all__ = ["check_forward_path", "example_input", "route_through_modules"]

Probe = bool | torch.Tensor | tuple | dict


def route_through_modules(model: nn.Module) -> list[str]:
    """Make known layers call their linears instead of reading ``.weight``; in place.

    timm EVA attention with a q / v bias computes ``F.linear(x, self.qkv.weight, bias)``;
    ``qkv_bias_separate=True`` selects timm's own equivalent ``self.qkv(x) + bias`` path.

    Returns:
        names of the modules switched.
    """
    switched = []
    for name, mod in model.named_modules():
        if (getattr(mod, "qkv_bias_separate", True) is False
                and getattr(mod, "q_bias", None) is not None
                and getattr(mod, "qkv", None) is not None):
            mod.qkv_bias_separate = True
            switched.append(name)
    return switched


def example_input(model: nn.Module, batch_size: int = 1) -> Any | None:
    """A random input batch for ``model``, or None when none can be built.

    timm models: ``(batch_size, *input_size)`` from the timm data config (the built image size,
    as :func:`trimtune.data.transforms.data_config`). transformers models: ``input_ids`` within
    the vocabulary, or ``pixel_values`` of the configured image size.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.is_meta:
        return None
    dev, dtype = param.device, param.dtype
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if cfg is not None and main == "input_ids" and getattr(cfg, "vocab_size", None):
        return {"input_ids": torch.randint(0, int(cfg.vocab_size), (batch_size, 8), device=dev)}
    if cfg is not None and main == "pixel_values" and getattr(cfg, "image_size", None):
        size = cfg.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        chans = getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(batch_size, chans, *size, device=dev, dtype=dtype)}
    if getattr(model, "pretrained_cfg", None) or hasattr(model, "patch_embed"):
        from ..data.transforms import data_config

        size = tuple(data_config(model)["input_size"])
        return torch.randn(batch_size, *size, device=dev, dtype=dtype)
    return None


def _scalar(out: Any) -> torch.Tensor | None:
    """Sum of every floating tensor in a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [s for s in (_scalar(o) for o in out) if s is not None]
        return torch.stack(parts).sum() if parts else None
    return None


def check_forward_path(model: nn.Module, modules: Iterable[str], probe: Probe = True, *,
                       what: str = "attach") -> None:
    """Prove that every module in ``modules`` is called by ``model``'s forward and that every
    parameter of them with ``requires_grad`` (all of them, for ``compress``) is reached by
    the gradient of the output.

    Runs in eval mode under ``enable_grad`` with ``torch.autograd.grad`` (no ``.grad`` is
    left on any parameter; every module's training mode and the ``requires_grad`` flags are
    restored).

    Args:
        model: the model after the modules were replaced.
        modules: qualified names of the replaced modules (wrappers or factorised layers).
        probe: see the module docstring (True / example input / False).
        what: the verb, for the message (``attach``, ``compress``, ``lora``...).

    Raises:
        TrimtuneError: a module is never called, a parameter gets no gradient, or the probe
            forward itself fails (e.g. a replaced layer's ``.weight`` read directly).
    """
    names = list(modules)
    if probe is False or not names:
        return
    if any(p.is_meta for p in model.parameters()):
        return  # planning on the meta device: nothing can run
    x = example_input(model) if probe is True else probe
    if x is None:
        warnings.warn(f"{what}: cannot build an example input for this {type(model).__name__}, "
                      "so the forward path of the replaced layers was not checked; pass "
                      "probe=<example input> (or probe=False to silence this)", stacklevel=3)
        return
    mods = {n: model.get_submodule(n) for n in names}
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: called.add(n)) for n, m in mods.items()]
    params = {f"{n}.{pn}": p for n, m in mods.items() for pn, p in m.named_parameters()
              if p.is_floating_point() and (what == "compress" or p.requires_grad)}
    flags = {k: p.requires_grad for k, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]  # restored module by module
    try:
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            try:
                out = (model(**x) if isinstance(x, dict) else
                       model(*x) if isinstance(x, tuple) else model(x))
            except Exception as e:  # noqa: BLE001 - reported as one clear line
                raise TrimtuneError(
                    f"{what}: the probe forward of this {type(model).__name__} failed after its "
                    f"layers were replaced ({type(e).__name__}: {e}); a layer probably reads a "
                    "replaced module's weight directly: exclude that layer from the targets, "
                    "or pass probe=<example input> if the input was wrong") from e
            loss = _scalar(out)
            keys = list(params)
            grads = (torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
                     if loss is not None and loss.requires_grad and keys else [None] * len(keys))
    finally:
        for h in hooks:
            h.remove()
        for k, p in params.items():
            p.requires_grad_(flags[k])
        for m, mode in modes:
            m.training = mode
    missing = [n for n in names if n not in called]
    if missing:
        raise TrimtuneError(
            f"{what}: {len(missing)} replaced module(s) never called by the forward pass, e.g. "
            f"{missing[0]!r} ({type(mods[missing[0]]).__name__}): the model reads that layer's "
            "weight directly instead of calling it, so its update would never train; drop it "
            "from the targets (target_modules / exclude) or pass probe=False to skip this check")
    cut = [k for k, g in zip(keys, grads) if g is None]
    if cut:
        raise TrimtuneError(
            f"{what}: {len(cut)} parameter(s) get no gradient from the model output, e.g. "
            f"{cut[0]!r}: that part of the layer is not on the forward path (its output is "
            "discarded or detached); drop it from the targets or pass probe=False")
