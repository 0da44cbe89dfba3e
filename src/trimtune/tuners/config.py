"""Configurations of the SNELL and SNELLA tuners (one dataclass per method, as PEFT)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TrimtuneError
from .kernels import KERNELS
from .snell import SPARSIFY, check_sparsity

#: Default targets: q/k/v (or fused qkv), attn.proj, mlp.fc1, mlp.fc2 of every block, and for a
#: compressed model (trimtune.lowrank) the ``.first`` / ``.second`` factors of those layers.
DEFAULT_TARGETS = r"(.*\.)?(qkv|q|k|v|attn\.proj|mlp\.fc1|mlp\.fc2)(\.first|\.second)?"


@dataclass
class SnellConfig:
    """SNELL: kernelised low-rank update, sparsified by magnitude competition in each layer.

    Args:
        rank: r, columns of the factors A (d_in, r) and B (d_out, r).
        kernel: ``"piecewise"`` (default), ``"mixture"`` (SNELLA), ``"inner"`` (LoRA-style
            ``A B^T``), ``"rbf"``, ``"sigmoid"``.
        segments: P, column blocks of the piecewise / mixture kernel (rank % P == 0).
        learnable_coeffs: learn the piecewise coefficients (paper) instead of fixed +-0.1 (code).
        sparsity: fraction s in [0, 1) of every update zeroed.
        sparsify: ``"code"`` (``dW |dW| 1[|dW| > t]`` with the magnitude detached: the
            authors' forward and backward), ``"squared"`` (the same forward, full derivative),
            ``"soft"`` (the paper, ``dW max(|dW| - t, 0)``) or ``"none"``. SNELL at
            ``sparsity=0`` uses the plain kernel update (``"none"``), as the authors' code
            (``KLoRA``); SNELLA always sparsifies (squares) as theirs.
        target_modules: regex (or list of regexes) matched against qualified module names;
            a pattern matches a name in full or a dotted suffix of it (``"qkv"`` matches
            ``blocks.0.attn.qkv``). ``None``: :data:`DEFAULT_TARGETS`. Only ``nn.Linear``.
        split_qkv: give a fused ``qkv`` linear three separate updates (q, k, v).
        modules_to_save: modules trained in full beside the adapter (the classifier head).
        train_tokens: parameters trained in full (the cls token), matched like targets.
        dropout: dropout on the branch input (not applied to ``attn.proj``, as the authors).
            Default 0. The authors used 0.1: set ``dropout=0.1, drop_path=0.1`` for paper
            parity; a stochastic branch cannot be fused with the base matmul, which costs
            about 2x training-step time on CPU.
        drop_path: DropPath on the branch output. Default 0 (authors: 0.1, see ``dropout``).
        recompute: recompute dW in backward instead of storing it (memory of LoRA).
        fused: when the branch has no dropout / drop-path (and always in eval mode), compute
            ``x @ (W + dW_s^T)^T + b`` as one matmul with a temporary merged weight: 3
            full-size matmuls per layer and step instead of 5, same result and gradients.
    """

    rank: int = 8
    kernel: str = "piecewise"
    segments: int = 2
    learnable_coeffs: bool = False
    sparsity: float = 0.5
    sparsify: str = "code"
    target_modules: str | Sequence[str] | None = None
    split_qkv: bool = True
    modules_to_save: Sequence[str] = ("head",)
    train_tokens: Sequence[str] = ("cls_token",)
    dropout: float = 0.0
    drop_path: float = 0.0
    recompute: bool = True
    fused: bool = True

    method = "snell"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise TrimtuneError(f"unknown kernel {self.kernel!r}: use one of {', '.join(KERNELS)}")
        if self.sparsify not in SPARSIFY:
            raise TrimtuneError(f"unknown sparsify {self.sparsify!r}: use one of "
                                f"{', '.join(SPARSIFY)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise TrimtuneError(f"rank {self.rank!r} must be a positive integer, e.g. 8 or 32")
        if not isinstance(self.segments, int) or self.segments < 1:
            raise TrimtuneError(f"segments {self.segments!r} must be a positive integer, e.g. 2")
        if self.kernel in ("piecewise", "mixture") and self.rank % self.segments:
            raise TrimtuneError(f"rank {self.rank} is not divisible by segments={self.segments}:"
                                " choose a rank that is a multiple of segments")
        check_sparsity(self.sparsity)
        for name in ("dropout", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise TrimtuneError(f"{name}={v} is outside [0, 1): use e.g. 0.1 or 0")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise TrimtuneError("target_modules is empty: give patterns or None for the default")
        self.modules_to_save = tuple(self.modules_to_save or ())
        self.train_tokens = tuple(self.train_tokens or ())
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)

    @property
    def unit_sparsify(self) -> str:
        """The sparsify mode the units run: ``"none"`` for SNELL at sparsity 0 (the authors'
        ``KLoRA``: no squaring), else ``sparsify``."""
        if self.method == "snell" and self.sparsity == 0 and self.sparsify in ("code",
                                                                                "squared"):
            return "none"
        return self.sparsify

    @property
    def initial_sparsity(self) -> float:
        """Sparsity every layer starts with when attached."""
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``"method"`` naming the config class."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnellConfig:
        """Inverse of :meth:`to_dict`; the ``"method"`` key picks SNELL or SNELLA."""
        d = dict(d)
        method = d.pop("method", cls.method)
        klass = {c.method: c for c in (SnellConfig, SnellaConfig)}.get(method)
        if klass is None:
            raise TrimtuneError(f"unknown tuner method {method!r}: expected 'snell' or 'snella'")
        names = {f.name for f in dataclasses.fields(klass)}
        unknown = set(d) - names
        if unknown:
            raise TrimtuneError(f"unknown {method} config keys {sorted(unknown)}: this adapter was "
                                "written by a newer trimtune; upgrade trimtune")
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = tuple(d["target_modules"])
        return klass(**d)


@dataclass
class SnellaConfig(SnellConfig):
    """SNELLA: SNELL with the mixture kernel and a bi-level sparsity allocator.

    The allocator (:class:`~trimtune.tuners.SnellaAllocator`, a training callback) moves the
    total budget from ``init_sparsity`` to ``target_sparsity`` on a cubic schedule and shares
    it across layers by importance. ``sparsity`` mirrors ``init_sparsity`` (the start).

    Args:
        init_sparsity: s_init, sparsity of every layer at the start.
        target_sparsity: s_target, overall fraction of update entries zeroed at the end.
        schedule_unit: count schedule time in optimizer ``"step"`` s or ``"epoch"`` s (code).
        t_init / t_final: warm-up and final phases of the cubic schedule, in schedule units.
        interval: reallocate every ``interval`` schedule units.
        beta1 / beta2: EMA factors of the sensitivity and uncertainty scores.
        size_aware: weight layer scores by layer size (a mean-based score otherwise gives a
            768x3072 matrix no more budget than a 768x768 one).
    """

    kernel: str = "mixture"
    sparsity: float = 0.0
    init_sparsity: float = 0.0
    target_sparsity: float = 0.7
    schedule_unit: str = "step"
    t_init: int = 0
    t_final: int = 0
    interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    size_aware: bool = False

    method = "snella"

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.init_sparsity)
        check_sparsity(self.target_sparsity)
        super().__post_init__()
        if self.schedule_unit not in ("step", "epoch"):
            raise TrimtuneError(f"schedule_unit {self.schedule_unit!r} is unknown: use 'step' "
                                "or 'epoch'")
        if self.interval < 1 or self.t_init < 0 or self.t_final < 0:
            raise TrimtuneError(f"interval={self.interval}, t_init={self.t_init}, t_final="
                                f"{self.t_final}: use interval >= 1 and t_init, t_final >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrimtuneError(f"{name}={getattr(self, name)} is outside [0, 1): use 0.85")


def config_from_dict(d: dict[str, Any]) -> SnellConfig:
    """Rebuild a :class:`SnellConfig` or :class:`SnellaConfig` from its ``to_dict()``."""
    return SnellConfig.from_dict(d)
