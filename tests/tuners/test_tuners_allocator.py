"""SNELLA allocator: cubic schedule, budget split, importance ordering, resume, heat-map."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trimtune.tuners.snell.config import SnellaConfig
from trimtune.errors import TrimtuneError
from trimtune.tuners.snell.allocator import (
    SnellaAllocator,
    allocate_budget,
    cubic_budget,
    find_units,
)


class Unit(nn.Module):
    """Stand-in for trimtune.tuners.snell.delta.SparseDelta (same contract attribute names)."""

    def __init__(self, d_in: int, d_out: int, r: int = 4) -> None:
        super().__init__()
        self.snell_A = nn.Parameter(torch.randn(d_in, r))
        self.snell_B = nn.Parameter(torch.randn(d_out, r))
        self.sparsity = 0.0
        self.numel_update = d_in * d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d_in) -> (N, d_out)
        return x @ (self.snell_A @ self.snell_B.T)


class Net(nn.Module):
    def __init__(self, sizes=((8, 8), (8, 8), (8, 32))) -> None:
        super().__init__()
        self.units = nn.ModuleList(Unit(i, o) for i, o in sizes)


def cfg(**kw):
    return SnellaConfig(**{"target_sparsity": 0.5, **kw})


def state(model, step=0, total=10, spe=5):
    return SimpleNamespace(model=model, step=step, total_steps=total, epoch=0,
                           steps_per_epoch=spe, accelerator=None, out_dir=None)


def run_step(alloc, st, step):
    """One optimizer step as trimtune.train.fit drives the callback: on_step_start before the
    forward (steps done = step - 1), after_optimizer_step after it."""
    st.step = step - 1
    alloc.on_step_start(st)
    st.step = step
    alloc.after_optimizer_step(st)


def fake_grads(model: nn.Module, scale: dict[int, float], g: torch.Generator) -> None:
    for i, u in enumerate(model.units):
        for p in (u.snell_A, u.snell_B):
            p.grad = scale.get(i, 1.0) * torch.randn(p.shape, generator=g)


# ---------------------------------------------------------------- schedule
def test_cubic_budget_phases_and_formula():
    T, V0, VT = 100, 1000.0, 300.0
    assert cubic_budget(0, T, V0, VT, 10, 20) == V0
    assert cubic_budget(10, T, V0, VT, 10, 20) == V0
    assert cubic_budget(81, T, V0, VT, 10, 20) == VT
    assert cubic_budget(T, T, V0, VT, 10, 20) == VT
    t = 45
    expected = VT + (V0 - VT) * (1 - (45 - 10) / (100 - 20 - 10)) ** 3
    assert cubic_budget(t, T, V0, VT, 10, 20) == pytest.approx(expected)
    # fractions of T mean the same as the absolute counts
    assert cubic_budget(t, T, V0, VT, 0.1, 0.2) == pytest.approx(expected)
    # monotone non-increasing
    vals = [cubic_budget(s, T, V0, VT, 10, 20) for s in range(T + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ---------------------------------------------------------------- budget split
def test_allocate_budget_sums_and_capacity():
    scores, caps = [0.5, 0.3, 0.2], [100, 1000, 1000]
    b = allocate_budget(777.7, scores, caps)
    assert sum(b) == 777
    assert all(0 <= bl <= c for bl, c in zip(b, caps))


def test_allocate_budget_caps_and_redistributes():
    # layer 0 would get 0.9 * 500 = 450 > its capacity 100: the 350 extra goes to the others
    b = allocate_budget(500, [0.9, 0.05, 0.05], [100, 1000, 1000])
    assert b[0] == 100
    assert sum(b) == 500
    assert b[1] == b[2] == 200  # equal scores -> equal shares of the rest
    # budget above total capacity: everyone full
    assert allocate_budget(10**6, [1, 2, 3], [4, 5, 6]) == [4, 5, 6]
    # all-zero / non-finite scores -> equal shares
    assert allocate_budget(30, [0, float("nan"), 0], [100, 100, 100]) == [10, 10, 10]


# ---------------------------------------------------------------- allocator
def test_higher_importance_gets_lower_sparsity_and_budget_holds():
    model = Net(((8, 8), (8, 8), (8, 8)))
    alloc = SnellaAllocator(model, cfg(target_sparsity=0.6), total_steps=10)
    st = state(model, total=10)
    alloc.on_train_start(st)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        fake_grads(model, {0: 10.0, 2: 0.1}, g)
        run_step(alloc, st, step)
    alloc.on_step_start(st)  # step 6 starts: the allocation decided after step 5 applies
    s = [u.sparsity for u in model.units]
    assert s[0] < s[1] < s[2]
    # the kept entries match V(t) within rounding (one entry per unit)
    kept = sum((1 - u.sparsity) * u.numel_update for u in model.units)
    V = alloc.budget(5, 10)
    assert abs(kept - V) <= 1 + 1e-6
    assert all(0 <= x < 1 for x in s)
    assert alloc.history[-1] == (5, {f"units.{i}": s[i] for i in range(3)})


def test_importance_is_the_per_factor_formula_bit_for_bit():
    """The batched (foreach) update gives exactly the AdaLoRA / authors' formula applied one
    factor at a time, over several steps, with a non-finite gradient entry and a unit without
    gradients; the scores are the normalised means of Ibar * U."""
    model = Net()
    b1, b2 = 0.85, 0.95
    alloc = SnellaAllocator(model, cfg(beta1=b1, beta2=b2), total_steps=10)
    g = torch.Generator().manual_seed(3)
    ref: dict = {}
    for step in range(3):
        fake_grads(model, {}, g)
        model.units[0].snell_A.grad[0, 0] = float("inf")
        if step == 1:
            model.units[1].snell_B.grad = None  # no gradient this step: left as it was
        alloc.update_importance()
        for i, u in enumerate(model.units):
            for key, p in (("A", u.snell_A), ("B", u.snell_B)):
                if p.grad is None:
                    continue
                ipt = torch.nan_to_num((p.detach() * p.grad).abs().float(), nan=0.0,
                                       posinf=0.0, neginf=0.0)
                ib, un = ref.get((i, key), (torch.zeros_like(ipt), torch.zeros_like(ipt)))
                ib = b1 * ib + (1 - b1) * ipt
                ref[(i, key)] = (ib, b2 * un + (1 - b2) * (ipt - ib).abs())
    for (i, key), (ib, un) in ref.items():
        assert torch.equal(alloc.ibar[f"units.{i}"][key], ib)
        assert torch.equal(alloc.unc[f"units.{i}"][key], un)
    raw = [sum(float((ref[(i, k)][0] * ref[(i, k)][1]).mean()) for k in "AB") for i in range(3)]
    assert list(alloc.scores().values()) == [r / sum(raw) for r in raw]


def test_min_density_floor_keeps_every_unit_trainable():
    """A unit whose gradients vanish is switched off by the authors' rule (min_density 0: its
    sparsity reaches the one-entry cap); with a floor it keeps >= min_density of its entries,
    and the total still matches V(t)."""
    def final(min_density):
        torch.manual_seed(0)
        model = Net(((8, 8), (8, 8), (8, 32)))
        alloc = SnellaAllocator(model, cfg(target_sparsity=0.7, init_sparsity=0.7,
                                           min_density=min_density), total_steps=10)
        st = state(model, total=10)
        alloc.on_train_start(st)
        g = torch.Generator().manual_seed(1)
        for step in range(1, 6):
            fake_grads(model, {0: 1e-6, 2: 10.0}, g)
            run_step(alloc, st, step)
        alloc.on_step_start(st)
        return model, alloc

    model, _ = final(0.0)
    assert model.units[0].sparsity == pytest.approx(1 - 1 / 64)  # switched off
    model, alloc = final(0.25)
    s = [u.sparsity for u in model.units]
    assert max(s) <= 0.75 + 1e-9 and s[0] == pytest.approx(0.75, abs=1 / 64)
    assert s[2] < s[0]  # the competition still decides the rest
    kept = sum((1 - u.sparsity) * u.numel_update for u in model.units)
    assert abs(kept - alloc.budget(5, 10)) <= 3


def test_min_density_must_fit_the_budget():
    for bad in (-0.1, 0.31, "x", True):
        with pytest.raises(TrimtuneError, match=r"min_density=.*outside \[0, 0.3\]"):
            cfg(target_sparsity=0.7, min_density=bad)
    assert cfg(target_sparsity=0.7, min_density=0.3).min_density == 0.3


def test_sparsity_stays_below_one_and_end_reaches_target():
    model = Net(((8, 8), (8, 8)))
    alloc = SnellaAllocator(model, cfg(target_sparsity=0.9), total_steps=4)
    st = state(model, total=4)
    alloc.on_train_start(st)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        fake_grads(model, {0: 1e6, 1: 0.0}, g)  # unit 1 has zero importance
        run_step(alloc, st, step)
    s1 = model.units[1].sparsity
    assert s1 == pytest.approx(1 - 1 / 64)  # at least one entry survives
    # the last allocation is the one decided after step T - 1 = 3 (none after the last step,
    # as the authors' start-of-epoch allocation for epochs 1..T-1): V(3) of the cubic schedule
    kept = sum((1 - u.sparsity) * u.numel_update for u in model.units)
    assert kept == pytest.approx(alloc.budget(3, 4), abs=1)
    assert alloc.pending is None and [t for t, _ in alloc.history] == [0, 1, 2, 3]


def test_warmup_keeps_init_sparsity_and_interval():
    model = Net()
    alloc = SnellaAllocator(model, cfg(init_sparsity=0.2, t_init=0.5, interval=2), total_steps=8)
    st = state(model, total=8)
    alloc.on_train_start(st)
    assert all(u.sparsity == pytest.approx(0.2) for u in model.units)
    g = torch.Generator().manual_seed(2)
    for step in range(1, 9):
        fake_grads(model, {0: 5.0}, g)
        run_step(alloc, st, step)
        if step <= 4:
            assert all(u.sparsity == pytest.approx(0.2) for u in model.units)
    assert [s for s, _ in alloc.history] == [0, 6]  # step 8 is the last: nothing after it


def test_epoch_schedule_and_size_aware():
    model = Net(((8, 8), (8, 64)))
    alloc = SnellaAllocator(model, cfg(schedule_unit="epoch", size_aware=True))
    st = state(model, total=10, spe=5)  # 2 epochs
    alloc.on_train_start(st)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        fake_grads(model, {}, g)
        run_step(alloc, st, step)
        if step % 5 == 0:
            alloc.on_epoch_end(st)
    assert [s for s, _ in alloc.history] == [0, 5]  # epoch 2 is the last: nothing after it
    kept = sum((1 - u.sparsity) * u.numel_update for u in model.units)
    assert kept == pytest.approx(alloc.budget(1, 2), abs=2)


def test_resume_continues_identically(tmp_path):
    def run(model, alloc, steps, g):
        st = state(model, total=12)
        alloc.on_train_start(st)
        for step in steps:
            fake_grads(model, {0: 3.0, 2: 0.3}, g)
            run_step(alloc, st, step)

    torch.manual_seed(0)
    ref_model = Net()
    torch.manual_seed(0)
    model = Net()
    ref = SnellaAllocator(ref_model, cfg(target_sparsity=0.7), total_steps=12)
    run(ref_model, ref, range(1, 13), torch.Generator().manual_seed(7))

    first = SnellaAllocator(model, cfg(target_sparsity=0.7), total_steps=12)
    g = torch.Generator().manual_seed(7)
    run(model, first, range(1, 7), g)
    path = tmp_path / "alloc.pt"
    torch.save(first.state_dict(), path)
    for u in model.units:
        u.sparsity = 0.0  # a fresh process would not have these
    second = SnellaAllocator(None, cfg(target_sparsity=0.7), total_steps=12)
    second.load_state_dict(torch.load(path, weights_only=True))
    run(model, second, range(7, 13), g)

    assert second.history == ref.history
    assert [u.sparsity for u in model.units] == [u.sparsity for u in ref_model.units]
    for n in ref.ibar:
        for k in ("A", "B"):
            assert torch.equal(ref.ibar[n][k], second.ibar[n][k])
            assert torch.equal(ref.unc[n][k], second.unc[n][k])


def test_heatmap_written(tmp_path):
    model = Net()
    alloc = SnellaAllocator(model, cfg(), total_steps=3)
    st = state(model, total=3)
    alloc.on_train_start(st)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        fake_grads(model, {1: 4.0}, g)
        run_step(alloc, st, step)
    out = tmp_path / "plots" / "sparsity.png"
    alloc.plot_history(out)
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_inputs():
    with pytest.raises(TrimtuneError, match="config"):
        SnellaAllocator(Net())
    with pytest.raises(TrimtuneError, match="schedule_unit"):
        SnellaAllocator(Net(), cfg(schedule_unit="minute"))
    with pytest.raises(TrimtuneError, match=r"outside \[0, 1\)"):
        SnellaAllocator(Net(), cfg(target_sparsity=1.0))
    with pytest.raises(TrimtuneError, match="no SNELL units"):
        SnellaAllocator(nn.Linear(2, 2), cfg())
    alloc = SnellaAllocator(Net(), cfg())
    with pytest.raises(TrimtuneError, match="total_steps"):
        alloc.on_train_start(SimpleNamespace(model=alloc.model, step=0, total_steps=None))


def test_find_units_names():
    assert list(find_units(Net())) == ["units.0", "units.1", "units.2"]
    assert math.isclose(sum(SnellaAllocator(Net(), cfg()).scores().values()), 1.0)


def test_with_real_snella_layers(images):
    """The allocator drives the real SparseDelta units of an attached tiny ViT."""
    import sys
    from pathlib import Path

    from trimtune.tuners import SnellaConfig, attach, iter_units

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_vit

    model = attach(tiny_vit(), SnellaConfig(r=4, init_sparsity=0.2, target_sparsity=0.6))
    units = dict(iter_units(model))
    config = SnellaConfig(r=4, init_sparsity=0.2, target_sparsity=0.6)
    alloc = SnellaAllocator(config=config)
    st = state(model, total=3)
    alloc.on_train_start(st)
    assert set(alloc.units) == set(units) and len(units) == 2 * 6  # q, k, v split + 3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    labels = torch.arange(len(images)) % 5
    for step in range(1, 4):
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        run_step(alloc, st, step)
        opt.zero_grad()
    kept = sum((1 - u.sparsity) * u.numel_update for u in units.values())
    assert kept == pytest.approx(alloc.budget(2, 3), abs=len(units))
    assert len({round(u.sparsity, 6) for u in units.values()}) > 1  # layers differ
    assert all(math.isfinite(v) for v in alloc.scores().values())


def test_epoch_end_is_the_last_step_of_the_epoch():
    """Epoch reallocation happens at the epoch's last optimizer step (so a checkpoint taken
    there holds it); a following on_epoch_end does not allocate twice; without
    steps_per_epoch, on_epoch_end alone drives the schedule."""
    model = Net()
    alloc = SnellaAllocator(model, cfg(schedule_unit="epoch"))
    st = state(model, total=6, spe=3)
    alloc.on_train_start(st)
    g = torch.Generator().manual_seed(4)
    for step in range(1, 4):
        fake_grads(model, {0: 2.0}, g)
        run_step(alloc, st, step)
    decided = alloc.pending
    assert decided is not None and [s for s, _ in alloc.history] == [0]  # not yet applied
    alloc.on_epoch_end(st)
    assert alloc.pending is decided  # no second allocation for the same epoch
    alloc.on_step_start(st)  # epoch 2's first step
    assert [s for s, _ in alloc.history] == [0, 3] and alloc.pending is None

    model = Net()
    alloc = SnellaAllocator(model, cfg(schedule_unit="epoch"), total_steps=6)
    st = SimpleNamespace(model=model, step=0, total_steps=6, steps_per_epoch=None)
    with pytest.raises(TrimtuneError, match="steps_per_epoch"):
        alloc.on_train_start(st)


def test_in_fit_loop_resume_equals_uninterrupted(tmp_path):
    """Inside trimtune.train.fit (epoch schedule), a run stopped mid-way and resumed from its
    checkpoint ends with the same allocation history as an uninterrupted run."""
    import sys
    from pathlib import Path

    from trimtune.train import TrainConfig, fit
    from trimtune.tuners import SnellaConfig, attach

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_vit

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=g),
                                          torch.arange(8) % 5)

    def objective(model, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        return loss, {}

    def run(out, max_steps=None):
        conf = SnellaConfig(r=4, init_sparsity=0.1, target_sparsity=0.6, schedule_unit="epoch",
                            dropout=0.0, drop_path=0.0)
        model = attach(tiny_vit(), conf)
        alloc = SnellaAllocator(config=conf)
        tc = TrainConfig(epochs=2, batch_size=4, lr=1e-2, out_dir=out, max_steps=max_steps,
                         progress=False, log_every=1, resume="auto")
        fit(model, data, objective, tc, callbacks=[alloc])
        return alloc

    ref = run(tmp_path / "ref")
    assert [s for s, _ in ref.history] == [0, 2]
    run(tmp_path / "cut", max_steps=2)
    resumed = run(tmp_path / "cut")
    assert resumed.history == ref.history
