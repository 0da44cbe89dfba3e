"""One training step of a method on a random batch, for the memory / speed benchmarks
(``benchmarks/bench_train.py`` and friends) and the quickstart's training-memory column, each
measured by :func:`trimtune.measure.memory.measure_subprocess`.

It builds a fine-tuning model (:mod:`trimtune.runs`, :mod:`trimtune.finetune_config`), so it
sits at the top with the quickstart, not in :mod:`trimtune.measure` (which stays below the
tuners and never imports them)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .errors import renamed


@renamed(rank="r", sparsity="target_sparsity")
def build_train_step(model: str, *, method: str = "snella", r: int = 8,
                     batch_size: int = 8, num_classes: int = 10, img_size: int | None = None,
                     weights: str | None = None, pretrained: bool = True,
                     compress_ratio: float | None = None, target_sparsity: float = 0.7,
                     device: str | None = None, seed: int = 0,
                     target_modules: str | list[str] | None = None,
                     method_kwargs: dict | None = None):
    """Build ``(model, step_fn)`` for the memory / speed benchmarks: one AdamW training step
    of ``method`` on a random batch (what a real step allocates: activations kept for
    backward, gradients, optimizer state), by name for ``measure_subprocess``
    (``"trimtune.train_step:build_train_step"``).

    For SNELLA the step also runs what :func:`trimtune.train.fit` runs after every optimizer
    step: the allocator callback (importance EMA update and, with ``schedule_unit="step"``,
    the cross-layer reallocation), so its time and memory are part of the figure.
    ``target_modules`` replaces the default targets (the one rule, every method);
    ``method_kwargs`` goes to ``FinetuneConfig.method_kwargs`` (e.g. SNELL's dropout).
    ``rank=`` / ``sparsity=``: the old spellings of ``r=`` / ``target_sparsity=``
    (a DeprecationWarning, for one release)."""
    from .finetune_config import FinetuneConfig, prepare
    from .models import create_backbone
    from .runs import load_model

    torch.manual_seed(seed)
    if Path(model).is_dir():
        m = load_model(model, num_classes=num_classes)
    else:
        m = create_backbone(model, pretrained=pretrained, weights=weights,
                            num_classes=num_classes, img_size=img_size, seed=seed)
    if compress_ratio:
        from .lowrank import compress
        m = compress(m, ratio=compress_ratio, inplace=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m.to(dev)
    m, callbacks = prepare(m, FinetuneConfig(method=method, r=r, target_sparsity=target_sparsity,
                                             target_modules=target_modules,
                                             method_kwargs=dict(method_kwargs or {})),
                           total_steps=100)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    size = m.patch_embed.img_size if hasattr(m, "patch_embed") else (224, 224)
    x = torch.randn(batch_size, 3, *size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    loss_fn = nn.CrossEntropyLoss()
    # the callback state fit() passes (see trimtune.train): enough for the SNELLA allocator
    state = SimpleNamespace(model=m, step=0, total_steps=100, epoch=0, steps_per_epoch=100,
                            accelerator=None, out_dir=None)
    for cb in callbacks:
        if hasattr(cb, "on_train_start"):
            cb.on_train_start(state)

    def step(phase=None) -> None:
        """One step; ``phase(name)``, if given, is a context manager entered around each part
        (``"start"``, ``"forward"``, ``"backward"``, ``"optimizer"``, ``"callbacks"``), e.g.
        to count or time them (``benchmarks/count_step_ops.py``)."""
        part = phase or (lambda name: contextlib.nullcontext())
        with part("start"):
            for cb in callbacks:
                if hasattr(cb, "on_step_start"):
                    cb.on_step_start(state)
        with part("forward"):
            loss = loss_fn(m(x), y)
        with part("backward"):
            loss.backward()
        with part("optimizer"):
            opt.step()
        state.step += 1
        with part("callbacks"):
            for cb in callbacks:  # before zero_grad: the allocator reads the gradients
                if hasattr(cb, "after_optimizer_step"):
                    cb.after_optimizer_step(state)
        opt.zero_grad(set_to_none=True)

    return m, step


__all__ = ["build_train_step"]
