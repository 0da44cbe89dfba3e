"""The one training loop (distillation and fine-tuning alike), on Hugging Face Accelerate.

Method-agnostic: a method plugs in an *objective* ``objective(model, batch) -> (loss, logs)``
(optional: ``setup(accelerator)``; ``find_unused_parameters = True`` when some trainable
parameters get no gradient, e.g. the head in label-free distillation) and *callbacks*
(``on_train_start``, ``on_step_start`` — before the first forward of each optimizer step —,
``after_optimizer_step``, ``on_log`` — after each logged record, its values in ``state.logs`` —,
``on_epoch_end``, ``on_evaluate`` — after ``eval_fn``, its metrics in
``state.logs``, the model still holding what was evaluated (the EMA average with ``ema``) —,
``state_dict``, ``load_state_dict``; see :mod:`trimtune.train.callbacks`). Runs on CPU, one GPU,
or several processes under ``accelerate launch`` / ``torchrun`` (DDP; gloo on CPU). Writes
``out_dir/metrics.jsonl``, ``out_dir/checkpoint/`` and, with ``select_metric``,
``out_dir/best/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin,
                               send_to_device, set_seed)
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import atomic_path, new_run_dir, run_folder
from ..errors import RunInterrupted, TrimtuneError
from .checkpointing import (checkpoint_path, load_checkpoint, numerics, numerics_note, rng_state,
                            save_checkpoint, set_rng_state)
from .callbacks import BestEpoch, LossWatch
from .config import TrainConfig, TrainResult, TrainState
from .sampler import EpochSampler

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


def fit(model: nn.Module, train_data: Dataset, objective: Objective, config: TrainConfig,
        callbacks: Sequence[Any] = (), eval_fn: Callable[[nn.Module], dict] | None = None,
        *, settings: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` in place on ``train_data`` by minimising ``objective``; see the module doc.

    Args:
        model: any ``nn.Module``; only parameters with ``requires_grad`` are optimised (AdamW,
            no weight decay on 1-D params and ``model.no_weight_decay()`` names).
        train_data: a map-style dataset; batches are collated by the default collate and moved
            to the device before ``objective(model, batch)`` is called.
        objective: ``(model, batch) -> (loss, {name: value})``.
        config: a :class:`TrainConfig`. ``config.out_dir`` holding a checkpoint is refused
            unless ``resume`` or ``overwrite`` is set (see :class:`TrainConfig`).
        callbacks: objects with any of the optional callback methods; their ``state_dict()``
            is part of every checkpoint.
        eval_fn: ``eval_fn(model) -> dict`` called (unwrapped model, eval mode) at each epoch end,
            before the checkpoint of that step.
        settings: the caller's settings that change the result (method, rank, loss weights,
            data...): stored in the checkpoint with ``config.result_settings()`` and compared on
            resume; a difference is refused with one line naming the setting.
    Returns:
        A :class:`TrainResult`.

    With ``config.ema``, evaluation (``eval_fn``, ``select_metric``) sees the EMA average of
    the trainable parameters, and the model is left holding that average at the end.

    SIGINT (Ctrl-C) and SIGTERM stop the loop at the next optimizer step, write a checkpoint
    and raise :class:`~trimtune.errors.RunInterrupted` saying how to resume (a second signal
    aborts at once).
    """
    main = int(os.environ.get("RANK", "0")) == 0
    out = Path(config.out_dir) if config.out_dir is not None else new_run_dir()
    config = dataclasses.replace(config, out_dir=out)
    with run_folder(out, resume=bool(config.resume), overwrite=config.overwrite, main=main,
                    markers=FIT_MARKERS) as work:
        staged = work != out
        # an interrupt of an overwriting run: run_folder keeps its checkpoint beside ``out``
        # (--overwrite --resume continues it) and says so
        result = fit_in(work, model, train_data, objective, config, callbacks, eval_fn,
                        settings=settings)
    if staged:  # the folder was swapped in: report final paths
        result = dataclasses.replace(result, out_dir=out, **{
            k: out / Path(v).relative_to(work) for k in ("checkpoint", "best", "metrics_file")
            if (v := getattr(result, k)) is not None})
    return result


FIT_MARKERS = ("checkpoint", "metrics.jsonl", "best")


def fit_in(folder: str | Path, model: nn.Module, train_data: Dataset, objective: Objective,
           config: TrainConfig, callbacks: Sequence[Any] = (),
           eval_fn: Callable[[nn.Module], dict] | None = None, *,
           settings: dict[str, Any] | None = None) -> TrainResult:
    """:func:`fit` inside a run folder its caller's :func:`~trimtune.checkpoint.run_folder`
    already holds, so a run is one transaction (``trimtune.finetune`` writes run.json, the
    loop's files and the adapter into the same staged folder): ``metrics.jsonl``,
    ``checkpoint/`` and ``best/`` go into ``folder`` as it is, with no check or swap of its own.
    Resumes from ``folder``'s checkpoint when ``config.resume`` says so."""
    with _signals_stop() as flag, _threads(config.threads):
        return _fit(model, train_data, objective, config, callbacks, eval_fn, Path(folder),
                    dict(settings or {}), flag)


@contextmanager
def _threads(n: int | None):
    """torch's CPU thread count set to ``n`` for the run (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _signals_stop():
    """SIGINT / SIGTERM set ``flag[0]`` to the signal number (the loop checkpoints and stops at
    the next optimizer step); a second signal raises KeyboardInterrupt at once. Handlers are
    installed only in the main thread and restored on exit."""
    flag: list[int] = [0]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _fit(model: nn.Module, train_data: Dataset, objective: Objective, config: TrainConfig,
         callbacks: Sequence[Any], eval_fn: Callable[[nn.Module], dict] | None, out: Path,
         settings: dict[str, Any], interrupt: list[int]) -> TrainResult:
    """The loop, top to bottom: set up, resume, then per optimizer step train, log, evaluate
    at each epoch end, checkpoint; the helpers below hold each part."""
    cfg = config
    settings = {**cfg.result_settings(), **settings}
    accelerator = _make_accelerator(cfg, getattr(objective, "find_unused_parameters", False))
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    sampler, steps_per_epoch, total_steps, warmup = _schedule(train_data, cfg, accelerator)
    optimizer, scheduler = _optimizer(model, cfg, total_steps, warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ema = ModelEmaV3(raw, decay=cfg.ema) if cfg.ema else None
    if hasattr(objective, "setup"):
        objective.setup(accelerator)  # e.g. move a frozen teacher to the device (never prepared)
    state = TrainState(model=raw, accelerator=accelerator, optimizer=optimizer, config=cfg,
                       out_dir=out, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    callbacks = [*callbacks, LossWatch()]  # every run: a loss far above its start is said
    # select_metric: the one best-epoch mechanism, writing out/best/ (its value is checkpointed)
    best = (BestEpoch(cfg.select_metric, cfg.select_mode, folder=out / "best" if main else None,
                      keep=False) if cfg.select_metric else None)
    saver = _Checkpointer(out, state, optimizer, scheduler, ema, callbacks, best, settings)
    if cfg.resume is True or (cfg.resume == "auto" and saver.file.is_file()):
        saver.resume()
    scheduler.step_update(num_updates=state.step)
    state.epoch = state.step // steps_per_epoch
    log = _Log(out, main, state.step)

    _call(callbacks, "on_train_start", state)
    bar = tqdm(total=total_steps, initial=state.step, disable=not (cfg.progress and main),
               dynamic_ncols=True, desc="train")
    meter, stopped = _Meter(), False
    model.train()
    while state.step < total_steps and not stopped:
        epoch = state.epoch
        for micro, batch in enumerate(_epoch_loader(train_data, sampler, cfg, state, accelerator)):
            batch = send_to_device(batch, accelerator.device)
            if micro % cfg.grad_accum == 0:  # before the first forward of an optimizer step
                _call(callbacks, "on_step_start", state)
            loss, logs = _train_step(model, objective, batch, optimizer, callbacks, state,
                                     saver.file)
            meter.add(_batch_len(batch) * accelerator.num_processes, {"loss": loss, **logs},
                      cfg.grad_accum)
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done: schedule, EMA, log, epoch end, checkpoint
            scheduler.step_update(num_updates=state.step)
            if ema is not None:
                ema.update(raw, step=state.step)
            meter.steps += 1
            last = state.step >= min(total_steps, cfg.max_steps or total_steps)
            if (last or state.step == 1 or state.step % cfg.log_every == 0
                    or state.step % steps_per_epoch == 0):
                _log_step(state, meter, optimizer, epoch, log, callbacks, bar)
            bar.update(1)
            state.epoch = state.step // steps_per_epoch
            if state.step % steps_per_epoch == 0:
                _end_epoch(model, raw, ema, eval_fn, callbacks, best, state, epoch, log)
            stopped = last or state.should_stop
            signum = _agree(interrupt[0], accelerator)
            if signum or stopped or (cfg.ckpt_every and state.step % cfg.ckpt_every == 0):
                saver()
            if signum:
                bar.close()
                raise _interrupted(signum, state, saver.file)
            if stopped:
                break
    bar.close()
    final = saver()
    if ema is not None:  # the result of an EMA run is the average: leave it in the model
        _copy_ema(raw, ema)
    log.close()
    best_dir = out / "best" if cfg.select_metric and (out / "best").is_dir() else None
    return TrainResult(metrics=dict(state.logs), history=log.history, step=state.step,
                       epoch=state.epoch, out_dir=out, checkpoint=final, best=best_dir,
                       metrics_file=log.file, stopped_early=state.step < total_steps, ema=ema,
                       warnings=list(state.warnings))


# ---- the parts of _fit ----------------------------------------------------------------------
def _schedule(train_data: Dataset, cfg: TrainConfig, accelerator: Accelerator
              ) -> tuple[EpochSampler, int, int, int]:
    """``(sampler, steps per epoch, total steps, warm-up steps)``: an epoch is whole optimizer
    steps of ``batch_size x processes x grad_accum`` samples."""
    if not hasattr(train_data, "__len__"):
        raise TrimtuneError("train_data has no length: pass a map-style Dataset (not a DataLoader "
                            "or iterable) so the loop can shuffle and resume it")
    sampler = EpochSampler(len(train_data), cfg.batch_size, seed=cfg.seed,
                           rank=accelerator.process_index, world=accelerator.num_processes)
    steps_per_epoch = sampler.num_batches // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrimtuneError(
            f"{len(train_data)} samples make no full step of batch_size={cfg.batch_size} x "
            f"{accelerator.num_processes} process(es) x grad_accum={cfg.grad_accum}: lower them")
    sampler.num_batches = steps_per_epoch * cfg.grad_accum  # an epoch = whole optimizer steps
    total_steps = cfg.epochs * steps_per_epoch
    warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
              else round(cfg.warmup_epochs * steps_per_epoch))
    return sampler, steps_per_epoch, total_steps, warmup


def _optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int, warmup: int
               ) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm's AdamW over the trainable parameters (groups: :func:`_param_groups`) and a cosine
    schedule with linear warm-up, stepped per optimizer step."""
    if not any(p.requires_grad for p in model.parameters()):
        raise TrimtuneError("the model has no trainable parameters: unfreeze some, or attach "
                            "a tuner")
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    param_group_fn=_param_groups(cfg.weight_decay))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup),
                                  lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.min_lr,
                                  warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


class _Checkpointer:
    """Writes ``out/checkpoint/`` (main process; once per step) and resumes from it: model,
    optimizer, schedule, EMA, callbacks' state, RNG, step, best value, settings, numerics."""

    def __init__(self, out: Path, state: TrainState, optimizer, scheduler, ema, callbacks: list,
                 best: BestEpoch | None, settings: dict[str, Any]) -> None:
        self.out, self.state, self.file = out, state, checkpoint_path(out)
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.callbacks, self.best, self.settings = callbacks, best, settings
        self.saved_at = -1

    def __call__(self) -> Path:
        s, acc = self.state, self.state.accelerator
        if acc.is_main_process and self.saved_at != s.step:
            self.saved_at = s.step
            save_checkpoint(self.out, {
                "model": s.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "callbacks": {f"{i}": cb.state_dict() for i, cb in enumerate(self.callbacks)
                              if hasattr(cb, "state_dict")},
                "rng": rng_state(), "step": s.step, "epoch": s.epoch,
                "batch": (s.step % s.steps_per_epoch) * s.config.grad_accum,
                "total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
                "best_value": self.best.value if self.best else None, "settings": self.settings,
                "numerics": numerics(acc.device)})
        acc.wait_for_everyone()
        return self.file

    def resume(self) -> None:
        """Load the checkpoint into the run, refusing other settings or another schedule."""
        s, ck = self.state, load_checkpoint(self.file)
        _same_settings(ck.get("settings"), self.settings, self.out)
        if (ck["total_steps"], ck["steps_per_epoch"]) != (s.total_steps, s.steps_per_epoch):
            raise TrimtuneError(
                f"checkpoint in {self.out} is for {ck['total_steps']} steps of "
                f"{ck['steps_per_epoch']} per epoch, this run has {s.total_steps} of "
                f"{s.steps_per_epoch}: use the same data, batch size, processes and epochs, or "
                f"set resume=False / another out_dir")
        s.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        for i, cb in enumerate(self.callbacks):
            if hasattr(cb, "load_state_dict") and f"{i}" in ck["callbacks"]:
                cb.load_state_dict(ck["callbacks"][f"{i}"])
        set_rng_state(ck["rng"])
        s.step = ck["step"]
        if self.best is not None:
            self.best.value = ck.get("best_value")
        note = numerics_note(ck.get("numerics"), numerics(s.accelerator.device))
        if note and s.accelerator.is_main_process:
            warnings.warn(note, stacklevel=5)


class _Log:
    """``out/metrics.jsonl`` (append-only, one JSON object per record; a fresh run starts it
    afresh, a resumed one drops the lines past its checkpoint), TensorBoard when installed,
    and the in-memory history; only the main process writes."""

    def __init__(self, out: Path, main: bool, step: int) -> None:
        self.out, self.main, self.file = out, main, out / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.tb = _tensorboard(out) if main else None
        if main:
            _trim_log(self.file, step)

    def __call__(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Meter:
    """Means of the objective's values over the optimizer steps since the last record, and the
    images per second over that time."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seen, self.t0 = 0, 0, time.perf_counter()

    def add(self, images: int, values: dict[str, Any], grad_accum: int) -> None:
        self.seen += images
        for k, v in values.items():
            v = float(torch.as_tensor(v).detach())
            self.sums[k] = self.sums.get(k, 0.0) + v / grad_accum

    def take(self) -> tuple[dict[str, float], float]:
        """``(means, images per second)``, then start over."""
        rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
        means = {k: v / self.steps for k, v in self.sums.items()}
        self.__init__()
        return means, rate


def _epoch_loader(train_data: Dataset, sampler: EpochSampler, cfg: TrainConfig,
                  state: TrainState, accelerator: Accelerator) -> DataLoader:
    """This epoch's batches, from where a resumed run stopped (seeded by seed + epoch)."""
    epoch, done_in_epoch = state.epoch, state.step % state.steps_per_epoch
    sampler.set_epoch(epoch, skip_batches=done_in_epoch * cfg.grad_accum)
    return DataLoader(train_data, batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.num_workers, drop_last=True,
                      generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      pin_memory=accelerator.device.type == "cuda")


def _train_step(model: nn.Module, objective: Objective, batch: Any, optimizer, callbacks: list,
                state: TrainState, ckpt_file: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """One micro-batch: forward (autocast), finite check, backward, clip; the optimizer steps
    on the last micro-batch of an accumulation (then ``after_optimizer_step``, gradients still
    there: allocators read them)."""
    accelerator, cfg = state.accelerator, state.config
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss, logs = objective(model, batch)
        _check_finite(loss, logs, state, accelerator, ckpt_file, cfg)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        if accelerator.sync_gradients:
            state.step += 1
            _call(callbacks, "after_optimizer_step", state)
        optimizer.zero_grad(set_to_none=True)
    return loss, logs


def _log_step(state: TrainState, meter: _Meter, optimizer, epoch: int, log: _Log,
              callbacks: list, bar: tqdm) -> None:
    """One training record (means since the last one, lr, images/s), then ``on_log``."""
    state.logs, rate = meter.take()
    lr = optimizer.param_groups[0]["lr"]
    log({"step": state.step, "epoch": epoch, **state.logs, "lr": lr, "img_per_s": rate})
    _call(callbacks, "on_log", state)
    bar.set_postfix(loss=f"{state.logs['loss']:.4g}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")


def _end_epoch(model: nn.Module, raw: nn.Module, ema: ModelEmaV3 | None, eval_fn, callbacks: list,
               best: BestEpoch | None, state: TrainState, epoch: int, log: _Log) -> None:
    """``on_epoch_end``, then evaluation (of the EMA average with ``ema``), ``on_evaluate`` and
    the best weights; before this step's checkpoint, so a run stopped here resumes with the
    epoch's work done."""
    _call(callbacks, "on_epoch_end", state)
    if eval_fn is None:
        return
    model.eval()
    with torch.no_grad(), _ema_weights(raw, ema):  # EMA on: it is evaluated
        val = {k: float(v) for k, v in eval_fn(raw).items()}
        state.logs.update(val)
        # e.g. BestEpoch reads state.logs and copies what was evaluated
        _call(callbacks, "on_evaluate", state)
        _keep_best(best, raw, val)
    model.train()
    log({"step": state.step, "epoch": epoch, **val})


def _interrupted(signum: int, state: TrainState, ckpt_file: Path) -> RunInterrupted:
    name = signal.Signals(signum).name
    return RunInterrupted(
        f"interrupted by {name} at optimizer step {state.step} of {state.total_steps}; "
        f"checkpoint written to {ckpt_file}: run the same command with --resume "
        "(resume=True) to continue", signum, step=state.step, total_steps=state.total_steps)


# ---- helpers ------------------------------------------------------------------------------------
def _make_accelerator(cfg: TrainConfig, find_unused: bool) -> Accelerator:
    """The run's Accelerator: DDP (gloo on the CPU) under torchrun, bf16 autocast on the CPU or
    GPU, fp16 on a GPU only; FSDP on the CPU refused; a lost multi-process launch reported."""
    mp = cfg.mixed_precision
    cuda = torch.cuda.is_available()
    if mp == "fp16" and not cuda:
        warnings.warn("mixed_precision='fp16' needs a GPU: training in float32 on the CPU "
                      "(use bf16 for autocast on the CPU)", stacklevel=3)
        mp = "no"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not cuda and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise TrimtuneError("FSDP needs CUDA GPUs and none is visible: on the CPU run DDP with "
                            "`torchrun --nproc_per_node N -m trimtune.cli ...` (drop --use_fsdp)")
    if world == 1 and "ACCELERATE_USE_CPU" in os.environ and os.environ.get("MASTER_ADDR"):
        # accelerate's simple launcher (every CPU launch without mpirun) sets MASTER_ADDR for
        # --num_processes > 1 but starts ONE process
        warnings.warn("`accelerate launch --num_processes N` started ONE process here "
                      "(WORLD_SIZE unset): for N processes on the CPU use `torchrun "
                      "--nproc_per_node N -m trimtune.cli ...`", stacklevel=3)
    # Accelerate keeps process-wide singletons: reset the per-run parts so successive fit()
    # calls in one process (distill, then finetune) may use other settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))
    # Accelerate only takes the multi-CPU (gloo) path under torchrun when told cpu=True.
    cpu_ddp = not cuda and world > 1
    return Accelerator(mixed_precision=mp, gradient_accumulation_plugin=plugin,
                       kwargs_handlers=[ddp], cpu=cpu_ddp)


def _param_groups(weight_decay: float) -> Callable[[nn.Module], list[dict]]:
    """timm's AdamW groups (no decay on 1-D parameters and ``no_weight_decay()`` names), each
    split by learning-rate multiplier: a module may map its own parameter names to one in an
    ``lr_scales`` dict (e.g. SNELL's ``b_lr_scale``); timm's scheduler applies a group's
    ``lr_scale``. Without any, the groups are exactly timm's."""
    from timm.optim._param_groups import param_groups_weight_decay

    def groups(model: nn.Module) -> list[dict]:
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        scale = {id(p): float(v) for m in model.modules()
                 for n, v in (getattr(m, "lr_scales", None) or {}).items()
                 for p in [getattr(m, n, None)] if isinstance(p, nn.Parameter)}
        out = []
        for g in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip):
            by: dict[float, list] = {}
            for p in g["params"]:
                by.setdefault(scale.get(id(p), 1.0), []).append(p)
            for s, ps in by.items():
                out.append({**g, "params": ps, **({"lr_scale": s} if s != 1.0 else {})})
        return out
    return groups


def _trim_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if step and line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def _call(callbacks: Iterable[Any], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _batch_len(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return len(x)


def _check_finite(loss: torch.Tensor, logs: dict[str, Any], state: TrainState,
                  accelerator: Accelerator, ckpt_file: Path, cfg: TrainConfig) -> None:
    """Stop with a clear message on a non-finite loss (all processes agree, no hang)."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() == 0:
        return
    terms = [k for k, v in logs.items() if not math.isfinite(float(v))] or ["loss"]
    kept = ""
    if ckpt_file.is_file():
        good = load_checkpoint(ckpt_file)["step"]
        kept = f"; the checkpoint of step {good} is kept in {ckpt_file.parent} for inspection"
    raise TrimtuneError(
        f"non-finite loss ({float(loss.detach())}) at optimizer step {state.step + 1} "
        f"(epoch {state.epoch}), term(s): {', '.join(terms)}{kept}. Fix: run again from the "
        f"start with --overwrite (overwrite=True) and a lower lr (now {cfg.lr:g}), or set "
        f"clip_grad, or mixed_precision 'no' / 'bf16' instead of fp16 (resuming would keep "
        f"the settings that diverged)")


@contextmanager
def _ema_weights(raw: nn.Module, ema: ModelEmaV3 | None):
    """Inside: ``raw``'s trainable parameters hold the EMA average; restored on exit."""
    if ema is None:
        yield
        return
    live = {n: p.detach().clone() for n, p in raw.named_parameters() if p.requires_grad}
    _copy_ema(raw, ema)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in raw.named_parameters():
                if n in live:
                    p.copy_(live[n])


@torch.no_grad()
def _copy_ema(raw: nn.Module, ema: ModelEmaV3) -> None:
    averaged = dict(ema.module.named_parameters())
    for n, p in raw.named_parameters():
        if p.requires_grad:
            p.copy_(averaged[n])


def _agree(signum: int, accelerator: Accelerator) -> int:
    """The signal any process received (0 if none): every process stops at the same step."""
    if accelerator.num_processes == 1:
        return signum
    t = torch.tensor([signum], device=accelerator.device)
    return int(accelerator.gather(t).max().item())


def _same_settings(saved: dict[str, Any] | None, now: dict[str, Any], out: Path) -> None:
    """Refuse a resume whose result-changing settings differ from the checkpoint's."""
    if saved is None:  # a checkpoint from before settings were recorded
        return
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if _norm(a) != _norm(b):
            raise TrimtuneError(
                f"cannot resume {out}: {key}={b!r} differs from the checkpoint's {key}={a!r}; "
                f"resume with {key}={a!r}, or start a fresh run with --overwrite "
                f"(overwrite=True) or another output folder")


def _norm(v: Any) -> Any:
    """Compare settings as JSON would store them (tuples == lists, Paths == strings)."""
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _keep_best(best: BestEpoch | None, raw: nn.Module, val: dict[str, float]) -> None:
    """``TrainConfig.select_metric``: ``best`` keeps (writes ``out/best/``) what improved it."""
    if best is None:
        return
    if best.metric not in val:
        raise TrimtuneError(f"select_metric={best.metric!r} is not in eval_fn's result "
                            f"{sorted(val)}: return it from eval_fn or change select_metric")
    best.update(raw, val[best.metric], val)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
