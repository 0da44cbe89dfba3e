"""The SNELL / SNELLA PEFT layer (on ``BaseTunerLayer``); its tuner model (``BaseTuner``,
registered under ``PeftType.SNELL`` / ``PeftType.SNELLA``) is :mod:`.model`.

    import peft, trimtune as tt
    pm = peft.get_peft_model(model, tt.SnellaConfig(r=8, target_modules="all-linear"))
    pm.save_pretrained("out");  peft.PeftModel.from_pretrained(fresh_model, "out")
    plain = pm.merge_and_unload()

The maths is trimtune's own (:mod:`.delta`, :mod:`.autograd`): per adapter a layer holds one
:class:`~trimtune.tuners.snell.delta.SparseDelta` per unit (three for a fused ``qkv``:
separate q, k, v updates, as the authors), and runs base layer and update in ONE matmul through
:class:`~trimtune.tuners.snell.autograd.FusedSnellFunction` whenever that is exact (no active
branch dropout / drop-path, always in eval mode). Each unit's sparsity is a buffer
(``zeroed``), so it is saved and loaded with the adapter.

The package :mod:`trimtune.tuners.snell` is shaped like a PEFT tuner package (``config``,
``layer``, ``model``, the PeftType shim ``peft_types``); it is the one implementation behind
:func:`trimtune.tuners.attach` too.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from timm.layers import DropPath
from torch import nn

from ...errors import TrimtuneError
from .autograd import FusedSnellFunction
from .config import SnellConfig
from .delta import SparseDelta
from .kernels import create_kernel

_ADAPTER_DICTS = ("snell_units", "snell_dropout", "snell_drop_path")


def is_fused_qkv(name: str) -> bool:
    """A timm fused ``qkv`` linear (or the ``.second`` factor of a compressed one)."""
    base = name[: -len(".second")] if name.endswith(".second") else name
    return base == "qkv" or base.endswith(".qkv")


class SnellLayer(BaseTunerLayer):
    """Per-adapter SNELL state of one adapted linear (PEFT's tuner-layer mixin).

    Attributes:
        base_layer: the frozen linear.
        snell_units: ``{adapter: ModuleList[SparseDelta]}``; the units tile the output rows.
        snell_dropout / snell_drop_path: ``{adapter: module}`` on the branch input / each
            unit's output (one DropPath draw per unit).
        snell_fused: ``{adapter: bool}``, whether the one-matmul path may be used.
    """

    adapter_layer_names = ("snell_units",)
    other_param_names = ("snell_dropout", "snell_drop_path", "snell_fused")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.snell_units = nn.ModuleDict()
        self.snell_dropout = nn.ModuleDict()
        self.snell_drop_path = nn.ModuleDict()
        self.snell_fused: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TrimtuneError(f"SNELL adapts nn.Linear layers only, got {type(base).__name__}:"
                                " choose linear layers in target_modules")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: SnellConfig, name: str = "",
                     inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` following ``config``; ``name`` is the module's
        qualified name (a fused ``qkv`` gets three units; ``attn.proj`` no branch dropout)."""
        if adapter_name in self.snell_units:
            raise TrimtuneError(f"adapter {adapter_name!r} already exists on {name or 'layer'}: "
                                "choose another adapter_name")
        n = 3 if config.split_qkv and is_fused_qkv(name) and self.out_features % 3 == 0 else 1
        units = [SparseDelta(self.in_features, self.out_features // n, config.r,
                             create_kernel(config.kernel, config.segments,
                                           config.learnable_coeffs),
                             sparsity=config.initial_sparsity, sparsify=config.unit_sparsify,
                             recompute=config.recompute, init_scale=config.init_scale,
                             b_init_scale=config.b_init_scale)
                 for _ in range(n)]
        for u in units:  # per-parameter lr multipliers, read by the training loop
            u.set_lr_scales(b=config.b_lr_scale, kernel=config.kernel_lr_scale)
        dropout = 0.0 if re.search(r"(^|\.)attn\.proj(\.|$)", name) else config.dropout
        self.add_units(adapter_name, units, dropout, config.drop_path, config.fused,
                       inference_mode)

    def add_units(self, adapter_name: str, units: list[SparseDelta], dropout: float = 0.0,
                  drop_path: float = 0.0, fused: bool = True, inference_mode: bool = False
                  ) -> None:
        """Add adapter ``adapter_name`` made of ``units`` (their outputs, concatenated, tile
        the layer's output rows)."""
        if sum(u.out_features for u in units) != self.out_features or any(
                u.in_features != self.in_features for u in units):
            raise TrimtuneError(f"delta units {[(u.in_features, u.out_features) for u in units]}"
                                f" do not tile a {self.in_features}->{self.out_features} layer")
        self.snell_units[adapter_name] = nn.ModuleList(units)
        self.snell_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.snell_drop_path[adapter_name] = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.snell_fused[adapter_name] = bool(fused)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def units(self, adapter_name: str) -> nn.ModuleList:
        return self.snell_units[adapter_name]


class SnellLinear(nn.Module, SnellLayer):
    """A frozen ``nn.Linear`` plus the SNELL updates of its adapters.

    ``out = base(x) + sum_a cat_u(DropPath_a(u(dropout_a(x))))`` over the active adapters;
    with one active adapter and no active dropout / drop-path, ``F.linear(x, W + dW_s^T, b)``
    in one fused matmul (same values and gradients).

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SnellConfig | None,
                 name: str = "", **kwargs: Any) -> None:
        super().__init__()
        SnellLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        if config is not None:
            self.update_layer(adapter_name, config, name)

    @classmethod
    def from_units(cls, base_layer: nn.Linear, units: list[SparseDelta], dropout: float = 0.0,
                   drop_path: float = 0.0, fused: bool = True, adapter_name: str = "default"
                   ) -> SnellLinear:
        """A layer with one adapter built from explicit units (the base is frozen)::

            SnellLinear.from_units(nn.Linear(768, 2304), [SparseDelta(768, 768, 8, k) ...])
        """
        base_layer.requires_grad_(False)
        layer = cls(base_layer, adapter_name, None)
        layer.add_units(adapter_name, list(units), dropout, drop_path, fused)
        return layer

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``dW_s^T`` of ``adapter`` in weight layout (out_features, in_features)."""
        return torch.cat([u.delta_weight() for u in self.snell_units[adapter]], dim=0)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W <- W + dW_s^T`` for the given (default: active) adapters."""
        for a in check_adapters_to_merge(self, adapter_names):
            if a not in self.snell_units:
                continue
            w = self.get_base_layer().weight
            delta = self.get_delta_weight(a).to(w.dtype)
            if safe_merge and not torch.isfinite(w.data + delta).all():
                raise TrimtuneError(f"merging adapter {a!r} gives non-finite weights: the "
                                    "adapter is broken (check the training loss)")
            with torch.no_grad():
                w.add_(delta)
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if a in self.snell_units:
                w = self.get_base_layer().weight
                with torch.no_grad():
                    w.sub_(self.get_delta_weight(a).to(w.dtype))

    # ------------------------------------------------------------------ forward
    def uses_fused_path(self, adapter: str | None = None) -> bool:
        """True when :meth:`forward` computes ``x @ (W + dW_s^T)^T + b`` in one matmul for
        ``adapter`` (default: the first active one): fusion on, no active branch dropout /
        drop-path (always true in eval mode)."""
        if adapter is None:
            adapter = next((a for a in self.active_adapters if a in self.snell_units), None)
        if not self.snell_fused.get(adapter, False):
            return False
        return not self.training or (isinstance(self.snell_dropout[adapter], nn.Identity)
                                     and isinstance(self.snell_drop_path[adapter], nn.Identity))

    def _fused_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        base = self.get_base_layer()
        w, bias, units = base.weight, base.bias, self.snell_units[adapter]
        if not torch.is_grad_enabled():
            return F.linear(x, w + self.get_delta_weight(adapter).to(w.dtype), bias)
        if not all(u.recompute for u in units):  # plain autograd: keeps dW for backward
            dws = torch.cat([u.delta() for u in units], dim=1)  # (in, out)
            return F.linear(x, w + dws.T.to(w.dtype), bias)
        meta, params = [], []
        for u in units:
            named = list(u.kernel.named_parameters())
            meta.append((u.kernel, u.sparsity, u.sparsify_mode, tuple(n for n, _ in named)))
            params += [u.snell_A, u.snell_B, *(p for _, p in named)]
        return FusedSnellFunction.apply(x, w, bias, tuple(meta), *params)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.snell_units]
        if len(active) == 1 and self.uses_fused_path(active[0]):
            return self._fused_forward(x, active[0])
        y = self.base_layer(x, *args, **kwargs)
        for a in active:
            h = self.snell_dropout[a](x)
            parts = [self.snell_drop_path[a](u(h)) for u in self.snell_units[a]]
            branch = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            y = y + branch.to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "snell." + super().__repr__()


__all__ = ["SnellLayer", "SnellLinear", "is_fused_qkv"]
