"""SNELLA bi-level sparsity allocation: the cross-layer budget competition.

SNELLA (arXiv 2510.24037) lets the adapted layers compete for one global budget ``V(t)`` of
non-zero update entries. The budget shrinks on AdaLoRA's cubic schedule from
``V0 = sum_l (1 - s_init) m_l n_l`` to ``VT = sum_l (1 - s_target) m_l n_l``; every
``interval`` steps (or epochs) it is split across layers in proportion to an AdaLoRA-style
importance score (sensitivity x uncertainty of the factor parameters ``A``, ``B``). Each layer
then turns its share into a sparsity ``s_l`` that its own magnitude competition (inside the
layer, see :mod:`trimtune.tuners.snell`) enforces at every forward.

The allocator is a training callback (see :func:`trimtune.train.fit`) and knows nothing of the
layer internals beyond this contract: a *unit* is any sub-module with attributes ``snell_A``,
``snell_B`` (parameters), ``sparsity`` (a settable float) and ``numel_update`` (``m * n``, the
number of entries of its dense update). A fused ``qkv`` linear contributes three units.

Under DDP/Accelerate ``after_optimizer_step`` runs after the gradients were all-reduced, so all
ranks compute identical scores and sparsities without any extra communication.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ...checkpoint import atomic_path
from ...errors import TrimtuneError

__all__ = ["cubic_budget", "allocate_budget", "find_units", "SnellaAllocator"]


def _absolute(t: float, T: float) -> float:
    """A schedule length given as a fraction of ``T`` (``0 < t < 1``) or as an absolute count."""
    return t * T if 0 < t < 1 else float(t)


def cubic_budget(t: float, T: float, V0: float, VT: float, t_init: float = 0,
                 t_final: float = 0) -> float:
    """AdaLoRA's cubic budget schedule.

    ``V(t) = V0`` for ``t <= t_init``; ``VT`` for ``t > T - t_final``; otherwise
    ``VT + (V0 - VT) * (1 - (t - t_init) / (T - t_final - t_init)) ** 3``.

    Args:
        t: current time (steps or epochs done).
        T: total time, in the same unit.
        V0: initial budget (number of non-zero update entries over all layers).
        VT: final budget.
        t_init: warm-up length, as a fraction of ``T`` (``0 < t_init < 1``) or a count.
        t_final: final-phase length, as a fraction of ``T`` or a count.
    """
    t_i, t_f = _absolute(t_init, T), _absolute(t_final, T)
    if t <= t_i:
        return float(V0)
    if t > T - t_f:
        return float(VT)
    frac = 1.0 - (t - t_i) / (T - t_f - t_i)
    return float(VT + (V0 - VT) * frac ** 3)


def allocate_budget(budget: float, scores: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``budget`` entries across layers by score, each capped at its capacity.

    First ``b_l = floor(budget * score_l)`` capped at ``capacity_l``; the leftover (from caps) is
    shared out again by score among the layers with room, until nothing is left or no layer has
    room. The rounding remainder (fewer entries than layers) goes one entry each to the
    highest-scoring layers with room, so ``sum(b) == min(floor(budget), sum(capacities))``.

    Args:
        budget: total number of entries to hand out.
        scores: non-negative layer scores (any scale); all-zero means equal shares.
        capacities: ``m_l * n_l`` per layer.

    Returns:
        Budgets ``b_l`` (ints, ``0 <= b_l <= capacity_l``).
    """
    if len(scores) != len(capacities):
        raise TrimtuneError("allocate_budget: scores and capacities differ in length; pass one "
                            "score per layer")
    n = len(scores)
    caps = [int(c) for c in capacities]
    sc = [float(s) if math.isfinite(s) and s > 0 else 0.0 for s in scores]
    b = [0] * n
    left = min(int(math.floor(max(budget, 0.0))), sum(caps))
    while left > 0:
        room = [i for i in range(n) if b[i] < caps[i]]
        if not room:
            break
        total = sum(sc[i] for i in room)
        weights = {i: (sc[i] / total if total > 0 else 1.0 / len(room)) for i in room}
        given = 0
        for i in room:
            g = min(int(math.floor(left * weights[i])), caps[i] - b[i])
            b[i] += g
            given += g
        left -= given
        if given == 0:  # rounding remainder: one entry each, best score first
            for i in sorted(room, key=lambda i: (-weights[i], i)):
                if left == 0:
                    break
                b[i] += 1
                left -= 1
    return b


def find_units(model: nn.Module) -> dict[str, nn.Module]:
    """All SNELL delta units of ``model`` by qualified name (modules with ``snell_A``,
    ``snell_B`` and ``sparsity``), in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules()
            if all(hasattr(m, a) for a in ("snell_A", "snell_B", "sparsity"))}


def _numel_update(unit: nn.Module) -> int:
    n = getattr(unit, "numel_update", None)
    if n is None:
        raise TrimtuneError(f"{type(unit).__name__} has no `numel_update` (m*n); SNELLA units "
                            "must expose it: update trimtune.tuners.snell")
    return int(n)


class SnellaAllocator:
    """Training callback that reallocates per-layer sparsity on SNELLA's cubic budget.

    After each optimizer step (gradients still present) it updates, for every unit and for
    ``theta`` in ``(A, B)``::

        I    = |theta * grad|                       # sensitivity, same shape as theta
        Ibar = beta1 * Ibar + (1 - beta1) * I       # smoothed sensitivity
        U    = beta2 * U + (1 - beta2) * |I - Ibar| # uncertainty

    The unit score is ``mean(Ibar_A * U_A) + mean(Ibar_B * U_B)`` (times ``m * n`` when
    ``config.size_aware``), normalised to sum 1 over units (uniform when all are zero or not
    finite). Every ``config.interval`` steps or epochs (``config.schedule_unit``; an epoch
    ends at the optimizer step where ``state.step % state.steps_per_epoch == 0``; a later
    ``on_epoch_end`` for the same epoch is a no-op) after the
    warm-up ``t_init``, the budget ``V(t)`` (:func:`cubic_budget`) is split by
    :func:`allocate_budget` (after setting aside each unit's floor ``config.min_density``,
    0 by default as the authors) and each unit gets
    ``sparsity = min(clamp(1 - b_l / (m_l n_l), 0, 1), 1 - 1 / (m_l n_l))`` (at least one entry
    survives). As in AdaLoRA, the allocation made on entering the final phase
    (``t > T - t_final``) is kept fixed afterwards. During warm-up every unit keeps ``s_init``.

    Timing (the authors' ``train_alloc.py``): the allocation decided after step (or epoch) ``t``
    is applied by ``on_step_start`` before the next forward, and none is decided after the
    last one, so the evaluated / saved model carries the masks of its last training step.
    A loop that never calls ``on_step_start`` gets it applied one step late.

    Args:
        model: the adapted model; if ``None`` it is taken from ``state.model`` at train start.
        config: a :class:`~trimtune.tuners.snell.config.SnellaConfig` (fields ``init_sparsity``,
            ``target_sparsity``, ``schedule_unit``, ``t_init``, ``t_final``, ``interval``,
            ``beta1``, ``beta2``, ``size_aware``).
        total_steps: total optimizer steps; defaults to ``state.total_steps``.

    Attributes:
        history: list of ``(step, {unit_name: sparsity})``, one entry at train start and one
            per applied reallocation (``step`` = optimizer steps done before the first forward
            that used it); see :meth:`plot_history`.
    """

    def __init__(self, model: nn.Module | None = None, config: Any = None,
                 total_steps: int | None = None) -> None:
        if config is None:
            raise TrimtuneError("SnellaAllocator needs config=SnellaConfig(...): pass the same "
                                "config given to trimtune.tuners.attach")
        self.config = config
        self.s_init = float(config.init_sparsity)
        self.s_target = float(config.target_sparsity)
        self.unit = str(config.schedule_unit)
        self.t_init = float(config.t_init)
        self.t_final = float(config.t_final)
        self.interval = int(config.interval)
        self.beta1 = float(config.beta1)
        self.beta2 = float(config.beta2)
        self.size_aware = bool(config.size_aware)
        self.min_density = float(getattr(config, "min_density", 0.0))
        if self.unit not in ("step", "epoch"):
            raise TrimtuneError(f"schedule_unit={self.unit!r} is not known; use 'step' or 'epoch'")
        if self.interval < 1:
            raise TrimtuneError(f"interval={self.interval} must be >= 1 (reallocate every N units)")
        for name, s in (("init_sparsity", self.s_init), ("target_sparsity", self.s_target)):
            if not 0.0 <= s < 1.0:
                raise TrimtuneError(f"{name}={s} is outside [0, 1); give the fraction of update "
                                    "entries to zero, e.g. 0.7")
        self.model = model
        self.total_steps = total_steps
        self.units: dict[str, nn.Module] = {}
        self.ibar: dict[str, dict[str, torch.Tensor]] = {}
        self.unc: dict[str, dict[str, torch.Tensor]] = {}
        self.sparsity: dict[str, float] = {}  # in force (what the units use)
        self.pending: dict[str, float] | None = None  # decided, applied at the next step start
        self._total_steps = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.num_updates = 0  # importance updates done (optimizer steps seen)
        self.epochs_done = 0
        self.frozen = False  # final phase reached: allocation kept fixed
        self._resumed = False
        self._T: float | None = None
        if model is not None:
            self._bind(model)

    # ------------------------------------------------------------------ set-up
    def _bind(self, model: nn.Module) -> None:
        self.model = model
        self.units = find_units(model)
        if not self.units:
            raise TrimtuneError("SnellaAllocator found no SNELL units in the model; attach "
                                "first: trimtune.tuners.attach(model, SnellaConfig(...))")
        self.capacity = {n: _numel_update(u) for n, u in self.units.items()}

    def horizon(self, state: Any = None) -> float:
        """Total schedule length ``T`` in the schedule unit (steps or epochs)."""
        total = self.total_steps or getattr(state, "total_steps", None)
        if not total:
            raise TrimtuneError("SnellaAllocator does not know the number of training steps; "
                                "pass total_steps=... or run it inside trimtune.train.fit")
        if self.unit == "step":
            return float(total)
        spe = getattr(state, "steps_per_epoch", None) or getattr(self, "_steps_per_epoch", None)
        if not spe:
            raise TrimtuneError("schedule_unit='epoch' needs state.steps_per_epoch; run inside "
                                "trimtune.train.fit or use schedule_unit='step'")
        self._steps_per_epoch = int(spe)
        return float(math.ceil(total / spe))

    def budget(self, t: float, T: float) -> float:
        """``V(t)``: total non-zero entries allowed over all units at time ``t`` of ``T``."""
        cap = sum(self.capacity.values())
        V0 = (1.0 - self.s_init) * cap
        VT = (1.0 - self.s_target) * cap
        return cubic_budget(t, T, V0, VT, self.t_init, self.t_final)

    def _push(self) -> None:
        for name, s in self.sparsity.items():
            self.units[name].sparsity = float(s)

    # ------------------------------------------------------------------ callback protocol
    # When an allocation happens (as the authors' train_alloc.py, which reallocates at the START
    # of epochs 1..T-1): it is computed after optimizer step t from the importance seen so far
    # and *applied* at ``on_step_start`` of step t + 1, before its forward; nothing is computed
    # after the last step (t = T). So every evaluation, checkpoint, best-epoch copy or save sees
    # exactly the masks its last training step used.
    def on_train_start(self, state: Any) -> None:
        if self.model is None or not self.units:
            self._bind(state.model)
        self._T = self.horizon(state)
        self._total_steps = int(self.total_steps or getattr(state, "total_steps", 0) or 0)
        if self._resumed:
            self._push()
            return
        self.sparsity = {n: min(self.s_init, 1.0 - 1.0 / self.capacity[n]) for n in self.units}
        self.pending = None
        self._push()
        self.history = [(int(getattr(state, "step", 0)), dict(self.sparsity))]

    def on_step_start(self, state: Any) -> None:
        """Apply the allocation computed after the previous optimizer step (if any)."""
        if self._T is None:
            self.on_train_start(state)
        self._apply_pending(int(getattr(state, "step", 0)))

    def _apply_pending(self, step: int) -> None:
        if self.pending is None:
            return
        self.sparsity, self.pending = self.pending, None
        self._push()
        self.history.append((step, dict(self.sparsity)))

    def after_optimizer_step(self, state: Any) -> None:
        if self._T is None:
            self.on_train_start(state)
        # a loop without on_step_start: apply what is still pending now (one step late)
        self._apply_pending(int(state.step) - 1)
        self.update_importance()
        if self._total_steps and int(state.step) >= self._total_steps:
            return  # no training step follows: keep the masks the last step trained with
        if self.unit == "step":
            t = int(state.step)
            if t % self.interval == 0:
                self.pending = self.allocate(t, self._T)
        else:
            # the last optimizer step of an epoch *is* the epoch end: deciding here (rather
            # than only in on_epoch_end) lands the pending allocation in any checkpoint taken
            # at that step, so a resumed run applies it before its first step
            spe = getattr(state, "steps_per_epoch", None)
            if spe and int(state.step) % int(spe) == 0:
                self._epoch_tick(state, int(state.step) // int(spe))

    def on_epoch_end(self, state: Any) -> None:
        if self.unit != "epoch":
            return
        if self._T is None:
            self.on_train_start(state)
        spe = getattr(state, "steps_per_epoch", None)
        self._epoch_tick(state, int(state.step) // int(spe) if spe else self.epochs_done + 1)

    def _epoch_tick(self, state: Any, t: int) -> None:
        """Epoch ``t`` (1-based) has ended: decide the next epoch's allocation once, every
        ``interval`` epochs, unless it was the last epoch."""
        if t <= self.epochs_done:
            return
        self.epochs_done = t
        if t < self._T and t % self.interval == 0:
            self.pending = self.allocate(t, self._T)

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients of every unit's ``A``, ``B`` into ``Ibar`` and ``U``.

        All factors at once (``torch._foreach_*``: a few kernels per step instead of ~16 per
        factor, which dominated a GPU step's launches), element for element the same
        arithmetic as one factor at a time."""
        keys, ps, gs = [], [], []
        for name, unit in self.units.items():
            for key, p in (("A", unit.snell_A), ("B", unit.snell_B)):
                if p.grad is not None:
                    keys.append((name, key))
                    ps.append(p.detach())
                    gs.append(p.grad.detach())
        if keys:
            ipt = [torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0)
                   for t in torch._foreach_abs(torch._foreach_mul(ps, gs))]
            ibar, unc = [], []
            for (name, key), i in zip(keys, ipt):
                old = self.ibar.setdefault(name, {}).get(key)
                if old is None:
                    ibar.append(torch.zeros_like(i))
                    unc.append(torch.zeros_like(i))
                else:
                    ibar.append(old.to(i.device))
                    unc.append(self.unc.setdefault(name, {})[key].to(i.device))
            # ibar = b1 * ibar + (1 - b1) * ipt;  unc = b2 * unc + (1 - b2) * |ipt - ibar|
            ibar = torch._foreach_add(torch._foreach_mul(ibar, self.beta1),
                                      torch._foreach_mul(ipt, 1 - self.beta1))
            dev = torch._foreach_abs(torch._foreach_sub(ipt, ibar))
            unc = torch._foreach_add(torch._foreach_mul(unc, self.beta2),
                                     torch._foreach_mul(dev, 1 - self.beta2))
            for (name, key), b, u in zip(keys, ibar, unc):
                self.ibar[name][key] = b
                self.unc.setdefault(name, {})[key] = u
        self.num_updates += 1

    def scores(self) -> dict[str, float]:
        """Normalised unit scores (sum 1; uniform when no finite positive score exists)."""
        # every factor's mean(Ibar * U) in one transfer (one device sync, not one per factor)
        parts = [(name, key) for name in self.units for key in ("A", "B")
                 if self.ibar.get(name, {}).get(key) is not None]
        means = dict(zip(parts, torch.stack([
            (self.ibar[n][k] * self.unc[n][k]).mean() for n, k in parts]).tolist()
            if parts else []))
        raw = {}
        for name in self.units:
            s = 0.0
            for key in ("A", "B"):
                if (name, key) in means:
                    s += means[(name, key)]
            if self.size_aware:
                s *= self.capacity[name]
            raw[name] = s if math.isfinite(s) and s > 0 else 0.0
        total = sum(raw.values())
        if total <= 0 or not math.isfinite(total):
            return {n: 1.0 / len(raw) for n in raw}
        return {n: v / total for n, v in raw.items()}

    # ------------------------------------------------------------------ allocation
    def allocate(self, t: float, T: float) -> dict[str, float] | None:
        """The per-unit sparsities for time ``t`` of ``T`` (``V(t)`` split by score), without
        applying them; ``None`` during warm-up (``t <= t_init``) or once frozen."""
        if t <= _absolute(self.t_init, T) or self.frozen:
            return None
        names = list(self.units)
        sc = self.scores()
        caps = [self.capacity[n] for n in names]
        # min_density: each unit's floor is set aside first, the rest competes by score
        floor = [int(math.floor(self.min_density * c)) for c in caps]
        b = allocate_budget(self.budget(t, T) - sum(floor), [sc[n] for n in names],
                            [c - f for c, f in zip(caps, floor)])
        b = [bl + f for bl, f in zip(b, floor)]
        out = {}
        for n, bl, c in zip(names, b, caps):
            s = min(max(1.0 - bl / c, 0.0), 1.0)
            out[n] = min(s, 1.0 - 1.0 / c)
        if t > T - _absolute(self.t_final, T):
            self.frozen = True
        return out

    def reallocate(self, t: float, T: float, step: int | None = None) -> dict[str, float]:
        """:meth:`allocate` and apply at once (outside a training loop); returns the
        sparsities in force."""
        new = self.allocate(t, T)
        if new is not None:
            self.pending = new
            self._apply_pending(int(t if step is None else step))
        return dict(self.sparsity)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: ``Ibar``, ``U`` per unit (tensors, on CPU),
        counters, current sparsities and the history."""
        def cpu(d: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
            return {n: {k: v.detach().cpu().clone() for k, v in kv.items()} for n, kv in d.items()}

        return {"ibar": cpu(self.ibar), "unc": cpu(self.unc), "sparsity": dict(self.sparsity),
                "pending": None if self.pending is None else dict(self.pending),
                "history": [(s, dict(sp)) for s, sp in self.history],
                "num_updates": self.num_updates, "epochs_done": self.epochs_done,
                "frozen": self.frozen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; sparsities are pushed to the units at once if the
        model is known, else at ``on_train_start``."""
        self.ibar = {n: dict(kv) for n, kv in d["ibar"].items()}
        self.unc = {n: dict(kv) for n, kv in d["unc"].items()}
        self.sparsity = {n: float(s) for n, s in d["sparsity"].items()}
        pending = d.get("pending")
        self.pending = None if pending is None else {n: float(s) for n, s in pending.items()}
        self.history = [(int(s), dict(sp)) for s, sp in d["history"]]
        self.num_updates = int(d["num_updates"])
        self.epochs_done = int(d["epochs_done"])
        self.frozen = bool(d["frozen"])
        self._resumed = True
        if self.units:
            unknown = set(self.sparsity) - set(self.units)
            if unknown:
                raise TrimtuneError(f"allocator state names units not in the model "
                                    f"({sorted(unknown)[:3]}...); resume with the same attach "
                                    "config and base model")
            self._push()

    # ------------------------------------------------------------------ plotting
    def plot_history(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Write a heat-map (units x time) of per-unit sparsity to ``path`` (png, pdf, svg)."""
        if not self.history:
            raise TrimtuneError("no allocation history yet; plot after training started")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from ...measure.plots import MAX_INCHES, evenly  # readable at any length
        names = list(self.history[0][1])
        cols = [self.history[i] for i in evenly(len(self.history), 300)]
        grid = torch.tensor([[sp.get(n, float("nan")) for _, sp in cols] for n in names])
        steps = [s for s, _ in cols]
        size = (min(MAX_INCHES, max(4.0, 0.25 * len(steps) + 3)),
                min(MAX_INCHES, max(3.0, 0.2 * len(names) + 1)))
        fig, ax = plt.subplots(figsize=size)
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ticks = _thin(range(len(steps)), 12)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        rows = _thin(range(len(names)), 40)
        ax.set_yticks(rows, [names[i] for i in rows], fontsize=6)
        ax.set_xlabel("optimizer step")
        ax.set_title(title or "SNELLA per-layer sparsity")
        fig.colorbar(im, ax=ax, label="sparsity (fraction zeroed)")
        fig.tight_layout()
        fmt = os.path.splitext(str(path))[1].lstrip(".") or "png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
        plt.close(fig)


def _thin(idx: Iterable[int], most: int) -> list[int]:
    idx = list(idx)
    step = max(1, math.ceil(len(idx) / most))
    return idx[::step]
