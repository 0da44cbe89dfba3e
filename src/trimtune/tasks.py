"""The two training tasks, each one call of the one loop (:func:`trimtune.train.fit`):

- :func:`distill`: PELA's intermediate pre-training of a compressed student from its teacher
  (objective from :mod:`trimtune.lowrank`);
- :func:`finetune`: a method of the registry (:mod:`trimtune.tuners.registry`) on labelled
  data, with the classification objective, the method's callbacks and best-epoch selection
  (:class:`trimtune.train.BestEpoch`), writing a run folder (:mod:`trimtune.runs`).

What a run tunes (:class:`FinetuneConfig`, :func:`prepare`) lives one floor down in
:mod:`trimtune.finetune_config`, below :mod:`trimtune.runs` too (re-exported here). These are the
only modules (besides the CLI) that import both the methods (``lowrank``, ``tuners``) and the
loop (``train``): the loop stays method-agnostic.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from . import __version__
from .checkpoint import new_run_dir, run_folder, write_json
from .data import (as_dataset, build_transform, check_classes, describe_data, disjoint_train,
                   stratified_choice)
from .errors import TrainingCollapseWarning, TrimtuneError
from .finetune_config import (FinetuneConfig, FinetuneResult, check_rank, prepare,  # noqa: F401
                              tuner_config)
from .lowrank import DistillConfig, set_trainable
from .measure import evaluate_model
from .measure.plots import plot_confusion, plot_curves
from .models import set_drop_path_rate
from .runs import base_spec, identity, input_size, load_model, run_base_spec, save
from .train import BestEpoch, ClassificationObjective, CollapseWatch, TrainConfig, fit
from .train.checkpointing import numerics
from .train.loop import fit_in
from .tuners import registry

# --------------------------------------------------------------------------- distill


def distill(student: nn.Module, teacher: nn.Module | str, data: Dataset | str,
            config: DistillConfig | None = None, *, max_images: int | None = None):
    """PELA intermediate pre-training: ``student`` (compressed) learns from the frozen
    ``teacher`` on ``data`` (labels optional). Trains ``student`` in place and returns the
    loop's result; the teacher is never updated."""
    cfg = config or DistillConfig()
    tc = cfg.train or TrainConfig()
    if isinstance(teacher, str):
        teacher = load_model(teacher, num_classes=getattr(student, "num_classes", None),
                             img_size=input_size(student))
    check_teacher(student, teacher)
    ds = as_dataset(data, "train", build_transform(student, train=False), tc.seed)
    if max_images and max_images < len(ds):
        ds = ds.subset(stratified_choice(ds.targets, max_images, tc.seed))
    set_trainable(student, cfg.trainable)
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "train"}
    settings.update(data=describe_data(data, ds), teacher=identity(teacher),
                    student=identity(student))
    return fit(student, ds, cfg.objective(teacher), tc, settings=settings)


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Distillation matches features block by block: the teacher must have the student's width,
    depth and resolution (it is the model the student was compressed from)."""
    for what, get in (("width", lambda m: getattr(m, "num_features", None)),
                      ("depth (blocks)", lambda m: len(m.blocks) if hasattr(m, "blocks") else None),
                      ("image size", input_size)):
        s, t = get(student), get(teacher)
        if s is not None and t is not None and s != t:
            raise TrimtuneError(f"teacher {what} {t} != student {what} {s}: distil from the model "
                                "the student was compressed from (same architecture and "
                                "--img-size)")


# --------------------------------------------------------------------------- finetune


def finetune(model: nn.Module | str, data: Dataset | str,
             config: FinetuneConfig | TrainConfig | None = None,
             *, eval_data: Dataset | str | None = None, test_data: Dataset | str | None = None,
             base_spec: dict | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with ``config.method`` (or the method already attached
    with :func:`trimtune.attach`: then ``config.method`` must name it; a plain
    :class:`~trimtune.train.TrainConfig` as ``config`` tunes the attached method with it).

    Model selection uses ``eval_data`` only (best validation epoch); without it the last
    epoch is kept. ``test_data`` is evaluated once, at the end, on the selected weights.
    The run folder (``config.train.out_dir``) receives run.json, metrics.jsonl, the adapter
    and plots. A folder that already holds a run is refused unless ``config.train.resume``
    (same result settings, checked against the checkpoint) or ``config.train.overwrite``
    (the new run replaces the old one only once it finished: a failure leaves the old one).

    ``config.train.seed`` fixes everything: the new classifier head (created here when the
    class count differs), the adapter init, the data order and the masks.

    Validating on the held-out part of the training set (``"X:1k@val"`` beside ``"X:1k"``)
    trains on the rest (``"X:1k@train800"``) and prints a note: validation never overlaps
    the training images.
    """
    attached = registry.method_of(model) if isinstance(model, nn.Module) else None
    if isinstance(config, TrainConfig):  # tt.finetune(model, data, tt.TrainConfig(...))
        config = FinetuneConfig(method=attached or "snella", train=config)
    cfg = config or FinetuneConfig(method=attached or "snella")
    tc = cfg.train
    main = int(os.environ.get("RANK", "0")) == 0  # under DDP only rank 0 writes the run folder
    out = Path(tc.out_dir) if tc.out_dir is not None else new_run_dir()
    if isinstance(data, str) and isinstance(eval_data, str):
        data = disjoint_train(data, eval_data)
    if cfg.task == "segmentation":  # its head, objective and metric: trimtune.segment
        from .segment import finetune_segmentation
        return finetune_segmentation(model, data, cfg, eval_data, test_data, base_spec, out, main)
    with run_folder(out, resume=bool(tc.resume), overwrite=tc.overwrite, main=main) as work:
        # other DDP processes write nothing but read what main writes (e.g. a staged run's
        # checkpoint on --overwrite --resume): they train "into" the same folder
        return _finetune(model, data, cfg, eval_data, test_data, base_spec, work if main else None,
                         final=out if main else work)


def _finetune(model, data, cfg: FinetuneConfig, eval_data, test_data, spec, out: Path | None,
              final: Path | None) -> FinetuneResult:
    tc = cfg.train
    seed = tc.seed
    probe = as_dataset(data, "train", None, seed)
    check_classes(probe, data)
    # the new head (when the class count differs) is part of the run: seeded like the rest
    if isinstance(model, str):
        spec = spec or {"model": model, "num_classes": probe.num_classes}
    attached = isinstance(model, nn.Module) and registry.method_of(model) is not None
    if attached and getattr(model, "num_classes", probe.num_classes) != probe.num_classes:
        raise TrimtuneError(f"the attached model predicts {model.num_classes} classes, the data "
                            f"has {probe.num_classes}: reset its head before trimtune.attach")
    model = load_model(model, num_classes=None if attached else probe.num_classes, seed=seed)
    tf_train = build_transform(model, train=True, protocol=cfg.protocol)
    tf_eval = build_transform(model, train=False, protocol=cfg.protocol)
    train_ds = as_dataset(data, "train", tf_train, seed)
    eval_ds = as_dataset(eval_data, "val", tf_eval, seed)
    test_ds = as_dataset(test_data, "test", tf_eval, seed)

    spec = run_base_spec(model, spec, out, attached=attached, resume=tc.resume)
    if cfg.drop_path_rate:
        set_drop_path_rate(model, cfg.drop_path_rate)
    torch.manual_seed(seed)  # adapter init: same seed, same start (and on every DDP rank)
    # the schedules (SNELLA allocator, AdaLoRA) take the loop's total steps (epochs x whole
    # steps per epoch x processes): max_steps only stops early, so a resumed run matches
    model, callbacks = prepare(model, cfg, total_steps=None)
    best = BestEpoch("val_acc")
    watch = CollapseWatch("val_acc", chance=1.0 / max(1, probe.num_classes))

    def eval_fn(m: nn.Module) -> dict:
        r = evaluate_model(m, eval_ds, batch_size=max(64, tc.batch_size), progress=False)
        return {"val_acc": r.top1}

    run_base = spec or base_spec(model)
    run_json = {"trimtune_version": __version__, "kind": "finetune", "config": cfg.to_dict(),
                "base": run_base, "data": describe_data(data, train_ds),
                # what besides the seed decides the bits (same numerics, same bits)
                "numerics": {**numerics(), "threads": tc.threads or torch.get_num_threads()}}
    if out and not tc.resume:  # a resume rewrites it only once its settings were accepted
        write_json(out / "run.json", run_json)
    # what changes the result besides the loop's own settings: compared on resume
    settings = {k: v for k, v in cfg.to_dict().items() if k != "train"}
    settings.update(data=describe_data(data, train_ds),
                    val_data=None if eval_ds is None else describe_data(eval_data, eval_ds),
                    base=run_base)
    # the loop writes into the folder finetune's run_folder holds: one transaction per run
    tc_run = dataclasses.replace(tc, out_dir=out or final, overwrite=False)
    result = fit_in(out or final, model, train_ds, ClassificationObjective(cfg.label_smoothing),
                    tc_run, callbacks=[*callbacks, best, watch],
                    eval_fn=eval_fn if eval_ds is not None else None, settings=settings)
    best.restore(model)
    if out and tc.resume:
        write_json(out / "run.json", run_json)
    test = None
    if test_ds is not None:
        r = evaluate_model(model, test_ds, batch_size=max(64, tc.batch_size),
                           progress=tc.progress)
        test = r.to_dict()
        if watch.near_chance(r.top1) and not watch.warned:  # e.g. no validation data
            msg = (f"test top-1 {r.top1:.3f} is near chance ({watch.chance:.3f}): the run did "
                   f"not learn; run again with a lower lr (now {tc.lr:g}), or train longer")
            warnings.warn(msg, TrainingCollapseWarning, stacklevel=2)
            result.warnings.append(msg)
        if out:
            plot_confusion(r.confusion, r.classes, out / "confusion.png",
                           title=f"{cfg.method}: test top-1 {r.top1:.3f}")
    if out:
        save(model, out / "adapter", method=cfg.method)
        summary = {"best_val_acc": best.value, "test_top1": test and test["top1"],
                   "warnings": list(getattr(result, "warnings", [])),
                   "test": test}
        write_json(out / "results.json", summary)
        if (out / "metrics.jsonl").is_file():
            plot_curves(out / "metrics.jsonl", out / "curves.png", title=cfg.method)
        for cb in callbacks:
            if hasattr(cb, "plot_history"):
                cb.plot_history(out / "sparsity.png")
    return FinetuneResult(model=model, out_dir=final if out else None,
                          best={"val_acc": best.value}, test=test,
                          history=getattr(result, "history", []),
                          warnings=list(getattr(result, "warnings", [])))


__all__ = ["FinetuneConfig", "FinetuneResult", "check_rank", "check_teacher", "distill",
           "finetune", "prepare", "tuner_config"]
