"""Configurations of the SNELL and SNELLA tuners: ``peft.PeftConfig`` subclasses, so one config
serves ``trimtune.attach`` and ``peft.get_peft_model`` alike and ``adapter_config.json`` is
PEFT's (``peft_type``, ``r``, ``target_modules``, ``modules_to_save``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from ...errors import TrimtuneError
from .kernels import KERNELS
from .peft_types import PeftType
from .sparsifier import SPARSIFY, check_sparsity
from ..targets import DEFAULT_TARGETS  # noqa: F401 - re-exported: the timm default pattern


@dataclass
class SnellConfig(PeftConfig):
    """SNELL: kernelised low-rank update, sparsified by magnitude competition in each layer.

    Args:
        r: the rank, columns of the factors A (d_in, r) and B (d_out, r).
        kernel: ``"piecewise"`` (default), ``"mixture"`` (SNELLA), ``"inner"`` (LoRA-style
            ``A B^T``), ``"rbf"``, ``"sigmoid"``.
        segments: P, column blocks of the piecewise / mixture kernel (r % P == 0).
        learnable_coeffs: learn the piecewise coefficients (paper) instead of fixed +-0.1 (code).
        sparsity: fraction s in [0, 1) of every update zeroed.
        sparsify: ``"code"`` (``dW |dW| 1[|dW| > t]`` with the magnitude detached: the
            authors' forward and backward), ``"squared"`` (the same forward, full derivative),
            ``"soft"`` (the paper, ``dW max(|dW| - t, 0)``), ``"mask"`` (beyond the authors:
            ``dW 1[|dW| > t]``, the competition without the squaring) or ``"none"``. SNELL at
            ``sparsity=0`` uses the plain kernel update (``"none"``), as the authors' code
            (``KLoRA``); SNELLA sparsifies (with "code", squares) at every sparsity as theirs.
        target_modules: PEFT's rule (:mod:`trimtune.tuners.targets`): a string is a regex
            matched against the whole module name, a list holds names or dotted name suffixes
            (``["qkv"]`` matches ``blocks.0.attn.qkv``), ``"all-linear"`` every linear but
            ``modules_to_save``. ``None``: the model's default, the same for every method
            (:func:`trimtune.tuners.targets.default_targets`: timm :data:`DEFAULT_TARGETS`,
            transformers PEFT's default for its model type, else its block linears). A
            matched factorised layer gets one update, on ``.second``.
        split_qkv: give a fused ``qkv`` linear three separate updates (q, k, v).
        modules_to_save: modules trained in full beside the adapter (the classifier head),
            PEFT's ``ModulesToSaveWrapper``; names or suffixes as in PEFT.
        train_tokens: parameters trained in full (the cls token), names or suffixes; saved
            with the adapter (shared by all adapters of a model, as LoRA's ``bias="all"``).
        dropout: dropout on the branch input (not applied to ``attn.proj``, as the authors).
            Default 0. The authors used 0.1: set ``dropout=0.1, drop_path=0.1`` for paper
            parity; a stochastic branch cannot be fused with the base matmul, which costs
            about 2x training-step time on CPU.
        drop_path: DropPath on the branch output. Default 0 (authors: 0.1, see ``dropout``).
        recompute: recompute dW in backward instead of storing it (memory of LoRA).
        fused: when the branch has no dropout / drop-path (and always in eval mode), compute
            ``x @ (W + dW_s^T)^T + b`` as one matmul with a temporary merged weight: 3
            full-size matmuls per layer and step instead of 5, same result and gradients.

    Options beyond the authors (each 1.0 = the authors' behaviour; measured in
    ``benchmarks/results/quality_i22_seeded_cpu.md`` and ``quality_i22_cpu.md``):
        kernel_lr_scale: learning-rate multiplier of the kernel's own parameters (SNELLA's
            scalars ``alpha``, ``gamma``, ``beta``; learnable coefficients). Adam moves a scalar
            by about lr per step whatever its gradient, and ``beta`` shifts every one of the
            d_in x d_out update entries at once: at lr >= 1e-2 it reaches +-0.2 in ten steps
            and the run can collapse to chance. ``0.01`` keeps them near their init.
        b_lr_scale: learning-rate multiplier of ``snell_B`` (the LoRA+ idea: the factor on the
            output side learns faster, e.g. 4).
        init_scale: multiplier of the factors' kaiming-uniform init (a smaller first update).
        b_init_scale: a further multiplier of ``snell_B``'s init; ``0`` starts the update at
            zero as LoRA does (B = 0). Only where the update is not squared (SNELL at sparsity
            0, ``sparsify="none"``): ``dW |dW|`` has no gradient at ``dW = 0``, so a squared
            update started at zero would never train, and that is refused.
    """

    r: int = 8
    kernel: str = "piecewise"
    segments: int = 2
    learnable_coeffs: bool = False
    sparsity: float = 0.5
    sparsify: str = "code"
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    split_qkv: bool = True
    modules_to_save: list[str] | None = field(default_factory=lambda: ["head"])
    train_tokens: list[str] | None = field(default_factory=lambda: ["cls_token"])
    dropout: float = 0.0
    drop_path: float = 0.0
    recompute: bool = True
    fused: bool = True
    kernel_lr_scale: float = 1.0
    b_lr_scale: float = 1.0
    init_scale: float = 1.0
    b_init_scale: float = 1.0

    method = "snell"
    _peft_type = PeftType.SNELL

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self._peft_type
        if self.kernel not in KERNELS:
            raise TrimtuneError(f"unknown kernel {self.kernel!r}: use one of {', '.join(KERNELS)}")
        if self.sparsify not in SPARSIFY:
            raise TrimtuneError(f"unknown sparsify {self.sparsify!r}: use one of "
                                f"{', '.join(SPARSIFY)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise TrimtuneError(f"r={self.r!r}: the rank must be a positive integer, e.g. 8 or 32")
        if not isinstance(self.segments, int) or self.segments < 1:
            raise TrimtuneError(f"segments {self.segments!r} must be a positive integer, e.g. 2")
        if self.kernel in ("piecewise", "mixture") and self.r % self.segments:
            raise TrimtuneError(f"r={self.r} is not divisible by segments={self.segments}:"
                                " choose a rank that is a multiple of segments")
        check_sparsity(self.sparsity)
        for name in ("kernel_lr_scale", "b_lr_scale", "init_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise TrimtuneError(f"{name}={v!r}: give a positive multiplier (1.0 = the "
                                    "authors' behaviour, e.g. 0.01 or 4)")
            setattr(self, name, float(v))
        v = self.b_init_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise TrimtuneError(f"b_init_scale={v!r}: give a multiplier >= 0 (1.0 = the authors' "
                                "init, 0 = LoRA's zero start)")
        self.b_init_scale = float(v)
        if self.b_init_scale == 0 and self.unit_sparsify != "none":
            raise TrimtuneError(
                f"b_init_scale=0 with the {self.unit_sparsify!r} sparsifier: at dW = 0 no entry "
                "survives the competition (and dW |dW| has no gradient), so the adapter would "
                "never train; use it with SNELL "
                "at sparsity 0 (--method snell --sparsity 0), or give b_init_scale > 0")
        for name in ("dropout", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise TrimtuneError(f"{name}={v} is outside [0, 1): use e.g. 0.1 or 0")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "train_tokens"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple, set)):
                setattr(self, name, sorted(v) if isinstance(v, set) else list(v))
        if self.target_modules == []:
            raise TrimtuneError("target_modules is empty: give patterns or None for the default")

    @property
    def unit_sparsify(self) -> str:
        """The sparsify mode the units run: ``"none"`` for SNELL at sparsity 0 (the authors'
        ``KLoRA``: no squaring), else ``sparsify``."""
        if self.method == "snell" and self.sparsity == 0 and self.sparsify in (
                "code", "squared", "mask"):
            return "none"
        return self.sparsify

    @property
    def initial_sparsity(self) -> float:
        """Sparsity every layer starts with when attached."""
        return self.sparsity

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnellConfig:
        """Inverse of ``to_dict()`` (PEFT's ``asdict``); ``peft_type`` picks SNELL or SNELLA."""
        return config_from_dict(d)


@dataclass
class SnellaConfig(SnellConfig):
    """SNELLA: SNELL with the mixture kernel and a bi-level sparsity allocator.

    The allocator (:class:`~trimtune.tuners.SnellaAllocator`, a training callback) moves the
    total budget from ``init_sparsity`` to ``target_sparsity`` on a cubic schedule and shares
    it across layers by importance. Sparsity means what it means for SNELL (the fraction of an
    update's entries zeroed); SNELLA's changes over training, so set ``init_sparsity`` and
    ``target_sparsity``: ``sparsity`` (SNELL's fixed fraction) is the start here, filled in
    from ``init_sparsity``, and a different value is refused (it would be silently replaced).

    Args:
        init_sparsity: s_init, sparsity of every layer at the start.
        target_sparsity: s_target, overall fraction of update entries zeroed at the end.
        sparsity: leave None (it becomes ``init_sparsity``); a value other than
            ``init_sparsity`` is a contradiction, refused in one line.
        schedule_unit: count schedule time in optimizer ``"step"`` s or ``"epoch"`` s (code).
        t_init / t_final: warm-up and final phases of the cubic schedule, in schedule units.
        interval: reallocate every ``interval`` schedule units.
        beta1 / beta2: EMA factors of the sensitivity and uncertainty scores.
        size_aware: weight layer scores by layer size (a mean-based score otherwise gives a
            768x3072 matrix no more budget than a 768x768 one).
        min_density: every unit keeps at least this fraction of its update's entries when the
            budget is shared (its sparsity is at most ``1 - min_density``). ``0`` is the
            authors' rule, under which a unit can be given no entries at all: its update is
            then zero, its factors get no gradient, its score decays and it never wins budget
            back (issue 22: at a fixed 70 % budget, q, k and fc1 of every block end switched
            off). At most ``1 - max(init_sparsity, target_sparsity)``.
    """

    kernel: str = "mixture"
    sparsity: float | None = None
    init_sparsity: float = 0.0
    target_sparsity: float = 0.7
    schedule_unit: str = "step"
    t_init: int = 0
    t_final: int = 0
    interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    size_aware: bool = False
    min_density: float = 0.0

    method = "snella"
    _peft_type = PeftType.SNELLA

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.sparsity != self.init_sparsity:
            raise TrimtuneError(
                f"SnellaConfig(sparsity={self.sparsity}) contradicts init_sparsity="
                f"{self.init_sparsity}: SNELLA's layers start at init_sparsity and end at "
                "target_sparsity; set those two (sparsity is SNELL's fixed fraction)")
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
        densest = 1.0 - max(self.init_sparsity, self.target_sparsity)
        md = self.min_density
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not 0.0 <= md <= densest:
            raise TrimtuneError(
                f"min_density={self.min_density} is outside [0, {densest:g}]: every unit's "
                f"floor must fit in the smallest budget (1 - max(init_sparsity, "
                f"target_sparsity)); use e.g. 0.1, or 0 for the authors' rule")


def config_from_dict(d: dict[str, Any]) -> SnellConfig:
    """Rebuild a :class:`SnellConfig` or :class:`SnellaConfig` from ``config.to_dict()`` (the
    contents of ``adapter_config.json``).

    Raises:
        TrimtuneError: another PEFT method's config, or keys this trimtune does not know.
    """
    d = dict(d)
    kind = str(getattr(d.get("peft_type"), "value", d.get("peft_type")) or "").upper()
    klass = {c._peft_type.value: c for c in (SnellConfig, SnellaConfig)}.get(kind)
    if klass is None:
        raise TrimtuneError(f"a {kind or 'untyped'} config is not a SNELL/SNELLA config: load it "
                            "with the method that wrote it (PEFT: peft.PeftConfig.from_pretrained)")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(d) - names
    if unknown:
        raise TrimtuneError(f"unknown {kind} config keys {sorted(unknown)}: this adapter was "
                            "written by a newer trimtune; upgrade trimtune")
    return klass(**d)
