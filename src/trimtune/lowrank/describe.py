"""``describe()``: parameters, FLOPs per image, rank and kept energy of a (compressed) model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import TrimtuneError
from .compress import factorised_layers
from .layers import LowRankLinear

__all__ = ["LayerInfo", "Description", "describe", "compare", "input_size_of"]


@dataclass
class LayerInfo:
    """One factorised layer: sizes, rank, parameters dense/low-rank, energy, FLOPs per image."""

    name: str
    in_features: int
    out_features: int
    rank: int
    params_dense: int
    params_lowrank: int
    energy: float | None = None
    flops_dense: int = 0
    flops_lowrank: int = 0


@dataclass
class Description:
    """Size and cost of a model; ``before`` = the same model with every factorised layer dense.

    FLOPs are per image (``FlopCounterMode`` convention: one multiply-add = 2 FLOPs).
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    input_size: tuple[int, ...]
    layers: list[LayerInfo] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    skip: list[str] | None = None

    @property
    def param_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / max(self.params_before, 1)

    @property
    def flop_ratio(self) -> float:
        """``flops_after / flops_before``."""
        return self.flops_after / max(self.flops_before, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d.update(param_ratio=self.param_ratio, flop_ratio=self.flop_ratio)
        return d

    def __str__(self) -> str:
        head = f"{'layer':<28} {'in':>6} {'out':>6} {'rank':>5} {'params':>17} {'energy':>7}"
        rows = [head, "-" * len(head)]
        for lay in self.layers:
            energy = "" if lay.energy is None else f"{lay.energy:.4f}"
            params = f"{_m(lay.params_dense)} -> {_m(lay.params_lowrank)}"
            rows.append(f"{lay.name[-28:]:<28} {lay.in_features:>6} {lay.out_features:>6} "
                        f"{lay.rank:>5} {params:>17} {energy:>7}")
        rows.append("-" * len(head))
        rows.append(f"factorised layers: {len(self.layers)}")
        rows.append(f"parameters: {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M"
                    f" ({self.param_ratio:.1%})")
        rows.append(f"FLOPs/image at {tuple(self.input_size)}: {self.flops_before / 1e9:.3f}G -> "
                    f"{self.flops_after / 1e9:.3f}G ({self.flop_ratio:.1%})")
        if self.policy:
            pol = {k: v for k, v in self.policy.items() if v not in (None, {}, [])}
            rows.append(f"policy: {pol}")
        return "\n".join(rows)


def _m(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model runs at: ``patch_embed.img_size`` (timm ViT/Swin built with a custom
    ``img_size``) else ``pretrained_cfg['input_size']``."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    chans = int(chans if chans is not None else (cfg.get("input_size") or (3,))[0])
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return chans, int(h), int(w)
    if cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    raise TrimtuneError("cannot tell the model's input size: pass input_size=(3, H, W)")


@torch.no_grad()
def describe(model: nn.Module, input_size: tuple[int, ...] | None = None) -> Description:
    """Parameters before/after, FLOPs per image, rank and kept energy per factorised layer.

    Args:
        model: a compressed (or plain) model.
        input_size: (C, H, W) of one image; default from the model (see :func:`input_size_of`).

    Returns:
        a :class:`Description`; ``print()`` it for a table, ``.to_dict()`` for JSON.
    """
    input_size = tuple(input_size) if input_size is not None else input_size_of(model)
    layers = factorised_layers(model)
    record = getattr(model, "trimtune_lowrank", None) or {}
    energy = record.get("energy", {})
    tokens: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: LowRankLinear, args, out):
            tokens[name] = tokens.get(name, 0) + args[0].numel() // mod.in_features
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except Exception as e:
        raise TrimtuneError(f"the model does not run on one image of size {input_size} ({e}): "
                            "pass the right input_size=(C, H, W)") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flops_after = int(counter.get_total_flops())

    infos = []
    for n, m in layers.items():
        i, o, r = m.in_features, m.out_features, m.rank
        t = tokens.get(n, 0)
        infos.append(LayerInfo(name=n, in_features=i, out_features=o, rank=r,
                               params_dense=i * o, params_lowrank=r * (i + o),
                               energy=energy.get(n), flops_dense=2 * t * i * o,
                               flops_lowrank=2 * t * r * (i + o)))
    params_after = sum(q.numel() for q in model.parameters())
    params_before = params_after + sum(li.params_dense - li.params_lowrank for li in infos)
    flops_before = flops_after + sum(li.flops_dense - li.flops_lowrank for li in infos)
    return Description(params_before=params_before, params_after=params_after,
                       flops_before=flops_before, flops_after=flops_after,
                       input_size=input_size, layers=infos, policy=record.get("policy"),
                       skip=record.get("skip"))


@torch.no_grad()
def compare(original: nn.Module, compressed: nn.Module,
            inputs: torch.Tensor | None = None) -> dict[str, float]:
    """Sizes of both models side by side and, given ``inputs`` (B, C, H, W), how close the
    compressed outputs are: relative L2 error and mean cosine similarity of the outputs."""
    a, b = describe(original), describe(compressed)
    res = {"params_original": a.params_after, "params_compressed": b.params_after,
           "flops_original": a.flops_after, "flops_compressed": b.flops_after,
           "param_ratio": b.params_after / a.params_after,
           "flop_ratio": b.flops_after / max(a.flops_after, 1)}
    if inputs is not None:
        modes = original.training, compressed.training
        original.eval()
        compressed.eval()
        ya, yb = original(inputs).flatten(1).float(), compressed(inputs).flatten(1).float()
        original.train(modes[0])
        compressed.train(modes[1])
        res["rel_error"] = float((ya - yb).norm() / ya.norm().clamp_min(1e-12))
        res["cosine"] = float(torch.nn.functional.cosine_similarity(ya, yb, dim=1).mean())
    return res
