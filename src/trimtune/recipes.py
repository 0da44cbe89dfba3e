"""Named fine-tuning recipes: ``fast`` (trimtune's defaults), ``authors`` (the released
SNELL / SNELLA scripts) and ``short`` (SNELLA's best measured configuration at short budgets).
No torch here: the command line reads it before anything heavy loads.

A recipe is a set of default values for ``trimtune finetune`` flags (names as the flags'
``dest``); flags given explicitly win. ``authors`` cites the scripts of github ssfgunner/SNELL:
``scripts/vtab/snella32/*.sh`` (SNELLA, VTAB), ``scripts/fgvc/snella32/*.sh`` (SNELLA, FGVC:
batch 16, model EMA 0.9999 via train_alloc_ema.py), ``scripts/vtab/snell32/*.sh`` (SNELL), and
the defaults of their ``train.py`` / ``train_alloc.py`` that the scripts do not override
(warm-up 10 epochs, min lr 1e-5, backbone ``--drop-path`` 0.1, branch dropout 0.1 and branch
DropPath 0.1 in ``TuningModule``). The task-specific target sparsity is not part of a recipe:
pass ``--sparsity`` (released values: ../shared/notes/snella.md section 3).
"""

from __future__ import annotations

RECIPES = ("fast", "authors", "short")

#: a recipe value meaning "the --sparsity given" (``short``'s init sparsity: a fixed budget)
TARGET = "target"

#: flag dest -> value, per (recipe, method); ``"fgvc"`` entries apply on top with --protocol fgvc
_AUTHORS = {
    "snella": dict(rank=32, batch_size=8, lr=1e-3, weight_decay=0.05, epochs=100,
                   warmup_epochs=10.0, min_lr=1e-5, init_sparsity=0.01, branch_dropout=0.1,
                   branch_drop_path=0.1, drop_path=0.1, schedule_unit="epoch", alloc_interval=1,
                   t_init=0, t_final=0, kernel_lr_scale=1.0),
    "snell": dict(rank=32, batch_size=16, lr=1e-3, weight_decay=0.01, epochs=200,
                  warmup_epochs=10.0, min_lr=1e-5, branch_dropout=0.1, branch_drop_path=0.1,
                  drop_path=0.1, kernel_lr_scale=1.0),
}
_AUTHORS_FGVC = {"snella": dict(batch_size=16, ema=0.9999), "snell": {}}

#: trimtune's fast settings (the built-in flag defaults): no branch regularisation, so the
#: update is fused with the base matmul (about 2x faster steps on the CPU), allocation per step;
#: the mixture kernel's scalars at 1/100 of the lr (``kernel_lr_scale``): at lr >= 1e-2 Adam
#: moves ``beta`` by ~lr per step, shifting every update entry, and the run can fall to chance
#: (benchmarks/results/quality_i22_cpu.md: authors 0.10 val at lr 0.0333, this 0.77)
FAST = dict(branch_dropout=0.0, branch_drop_path=0.0, drop_path=0.0, schedule_unit="step",
            alloc_interval=1, t_init=0, t_final=0, kernel_lr_scale=0.01)


#: SNELLA at short budgets (beyond the authors; issue 22): the inner-product kernel A B^T, the
#: competition without the squaring (``mask``), a budget fixed at the target from step 0, every
#: layer keeping >= 10 % of its entries, reallocation at epoch ends. 3 epochs at 56 px, 2 CPU
#: studies of 5 paired seeds (benchmarks/results/quality_i22_seeded*_cpu.md), the sparsity
#: chosen on val (0.5 Fashion-MNIST, 0.7 MNIST): vs LoRA -0.09 +- 1.73 / +1.55 +- 1.09 (10
#: seeds); vs ``fast`` at 0.7 +0.39 +- 1.33 / +3.60 +- 1.17 (one study). Not the default: it
#: drops the authors' kernel and was measured at 3 epochs only
SHORT = dict(FAST, kernel="inner", sparsify="mask", init_sparsity=TARGET, min_density=0.1,
             schedule_unit="epoch")


def recipe_values(name: str, method: str, protocol: str = "vtab") -> dict:
    """The flag values recipe ``name`` sets for ``method`` (flag dest -> value).

    Raises:
        ValueError: an unknown recipe, or ``authors`` for a method the authors did not release
            (the message names the fix; the CLI turns it into exit code 2).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    if name == "fast":
        return dict(FAST)
    if name == "short":
        if method != "snella":
            raise ValueError(f"recipe 'short' is SNELLA's short-budget configuration; method "
                             f"{method!r} has none: use --recipe fast or --method snella")
        return dict(SHORT)
    if method not in _AUTHORS:
        raise ValueError(f"recipe 'authors' reproduces the released SNELL / SNELLA scripts; "
                         f"method {method!r} has none: use --recipe fast or --method snella")
    values = {**FAST, **_AUTHORS[method]}
    if method == "snell":  # no allocator: the schedule flags do not apply
        for k in ("schedule_unit", "alloc_interval", "t_init", "t_final"):
            values.pop(k)
    if protocol == "fgvc":
        values.update(_AUTHORS_FGVC[method])
    return values


def recipe_table() -> str:
    """A markdown table of every recipe's values (README, ``--help``)."""
    keys = sorted({k for m in _AUTHORS.values() for k in m} | set(SHORT) | {"ema"})
    cols = [("fast (snella, snell)", FAST), ("short (snella)", {
        **SHORT, "init_sparsity": "= --sparsity"}), ("authors snella vtab", recipe_values(
        "authors", "snella")), ("authors snella fgvc", recipe_values("authors", "snella", "fgvc")),
            ("authors snell vtab", recipe_values("authors", "snell"))]
    lines = ["| flag | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| `--{k.replace('_', '-')}` | " + " | ".join(
            str(v.get(k, "(flag default)")) for _, v in cols) + " |")
    return "\n".join(lines)
