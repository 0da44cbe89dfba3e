"""The segmentation task of :func:`trimtune.finetune` (``FinetuneConfig(task="segmentation")``,
``trimtune finetune --task segmentation``): it supplies the head, the objective and the metric;
every tuning method of the registry works with it, on an original or a compressed backbone.

- head: a decode head on the backbone's patch tokens (:class:`~trimtune.heads.SegmentationModel`,
  DINOv2's ``linear`` / ``linear4`` heads), trained in full by every method (``linear``: only it);
- objective: per-pixel cross-entropy, ignore index 255
  (:class:`~trimtune.train.objectives.SegmentationObjective`);
- metric: mIoU (best-validation selection, ``val_miou``) and pixel accuracy from one confusion
  matrix (:mod:`trimtune.measure.segmentation`);
- data: ``seg:PATH``, the ADE20K / mmseg layout (:mod:`trimtune.data.segmentation`), every mask
  checked before anything is written.

``task_options``: ``head`` (``"linear"`` | ``"linear4"``) and ``reduce_zero_label`` (mmseg's:
0 -> ignored, k -> k - 1). The run folder holds what a classification run holds (``run.json``
with the base and the ``segmenter`` record that wraps it, ``adapter/``, ``results.json``,
``metrics.jsonl``, curves) plus ``masks.png`` (test predictions); ``trimtune.load_model(run)``
rebuilds the tuned model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .data import as_dataset
from .errors import TrimtuneError
from .names import TASKS

SEG_OPTIONS = {"head": "linear", "reduce_zero_label": False}


def check_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the task's defaults filled in; unknown keys / values refused."""
    if task not in TASKS:
        raise TrimtuneError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    allowed = SEG_OPTIONS if task == "segmentation" else {}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TrimtuneError(f"task {task!r} takes no option(s) {unknown}; its options: "
                            f"{', '.join(allowed) or 'none'}")
    out = {**allowed, **options}
    if task == "segmentation":
        from .heads import HEADS
        if out["head"] not in HEADS:
            raise TrimtuneError(f"unknown segmentation head {out['head']!r}: use one of "
                                f"{', '.join(HEADS)}")
        out["reduce_zero_label"] = bool(out["reduce_zero_label"])
    return out


class SegmentationTask:
    """A decode head on the backbone's patch tokens; per-pixel cross-entropy; mIoU."""

    name = "segmentation"
    metric = "val_miou"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.options = check_options("segmentation", dict(cfg.task_options or {}))

    def dataset(self, data, split: str, transform, seed: int):
        from .data.segmentation import SegDataset

        ds = as_dataset(data, split, transform, seed)
        if ds is None:
            return None
        if not isinstance(ds, SegDataset):
            if isinstance(data, str):
                raise TrimtuneError(f"{data} is not segmentation data: --task segmentation reads "
                                    "seg:PATH (images/ + annotations/ folders, ADE20K layout)")
            return ds  # a user's own dataset of (image, mask) tensors
        return ds.with_options(reduce_zero_label=self.options["reduce_zero_label"])

    def check_data(self, data, eval_data, test_data, seed: int) -> None:
        """Every mask of every split given as a spec is read and checked (sizes, labels, the
        classes file) before anything is written."""
        for spec, split in ((data, "train"), (eval_data, "val"), (test_data, "test")):
            if isinstance(spec, str):
                self.dataset(spec, split, None, seed).validate()

    def num_classes(self, data, seed: int) -> int:
        return self.dataset(data, "train", None, seed).num_classes

    def segmenter(self, num_classes: int) -> dict:
        """The record that wraps a rebuilt backbone (``run.json`` base ``segmenter``)."""
        return {"num_classes": num_classes, "head": self.options["head"]}

    def build_model(self, model, num_classes: int, attached: bool, seed: int) -> nn.Module:
        from .heads import SegmentationModel, segmenter
        from .runs import load_model

        if isinstance(model, SegmentationModel):
            if attached and model.num_classes != num_classes:
                raise TrimtuneError(f"the attached model predicts {model.num_classes} classes, "
                                    f"the data has {num_classes}: reset its head before "
                                    "trimtune.attach")
            return load_model(model, num_classes=None if attached else num_classes, seed=seed)
        if attached:
            raise TrimtuneError("the method is attached to a backbone, not to a segmentation "
                                "model: attach it to trimtune.segmenter(backbone, num_classes) "
                                "instead, or pass the plain backbone")
        backbone = load_model(model, num_classes=0, seed=seed)
        return segmenter(backbone, num_classes, head=self.options["head"], seed=seed)

    def transforms(self, model: nn.Module):
        from .data.segmentation import seg_transform

        p = self.cfg.protocol
        return seg_transform(model, train=True, protocol=p), seg_transform(model, protocol=p)

    def objective(self):
        from .train.objectives import SegmentationObjective
        return SegmentationObjective(label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model: nn.Module, ds, batch_size: int) -> dict:
        from .measure.segmentation import evaluate_segmentation

        r = evaluate_segmentation(model, ds, batch_size=batch_size, progress=False)
        return {"val_miou": r.miou, "val_pixel_acc": r.pixel_acc}

    def test(self, model: nn.Module, ds, batch_size: int, out: Path | None) -> dict:
        from .measure.segmentation import evaluate_segmentation

        r = evaluate_segmentation(model, ds, batch_size=batch_size,
                                  progress=self.cfg.train.progress)
        if out:
            predicted_masks(model, ds, out / "masks.png",
                            title=f"{self.cfg.method}: test mIoU {r.miou:.3f}")
        return r.to_dict()

    def summary(self, best: float | None, test: dict | None) -> dict:
        return {"best_val_miou": best, "test_miou": test and test["miou"],
                "test_pixel_acc": test and test["pixel_acc"], "test": test}


def evaluate_command(model: nn.Module, a: Any) -> int:
    """``trimtune evaluate`` of a segmentation model: mIoU, pixel accuracy and per-class IoU on
    ``a.data`` / ``a.split``, written to ``eval_SPLIT.json`` with a ``masks_SPLIT.png``. A run
    folder's ``reduce_zero_label`` applies to its data."""
    from .checkpoint import read_json, write_json
    from .data.segmentation import seg_transform
    from .measure.segmentation import evaluate_segmentation

    options = {}
    if Path(a.model, "run.json").is_file():
        options = read_json(Path(a.model, "run.json")).get("config", {}).get("task_options", {})
    cfg = type("Cfg", (), {"task_options": options, "protocol": "vtab"})()
    ds = SegmentationTask(cfg).dataset(a.data, a.split, seg_transform(model), a.seed)
    ds.validate()
    if model.num_classes != ds.num_classes:
        raise TrimtuneError(f"the model predicts {model.num_classes} classes but {a.data} has "
                            f"{ds.num_classes}: evaluate a model fine-tuned on it")
    r = evaluate_segmentation(model, ds, batch_size=a.batch_size)
    print(f"mIoU: {r.miou:.4f}, pixel accuracy {r.pixel_acc:.4f} on {r.num_images} images "
          f"({a.data}, {a.split})")
    for n, iou in zip(r.classes or range(len(r.per_class_iou)), r.per_class_iou):
        print(f"  {n!s:<20} {'-' if iou is None else f'{iou:.4f}'}")
    out = Path(a.out) if a.out else (Path(a.model) if Path(a.model).is_dir() else Path("."))
    write_json(out / f"eval_{a.split}.json", r.to_dict())
    png = predicted_masks(model, ds, out / f"masks_{a.split}.png",
                          title=f"{a.split}: mIoU {r.miou:.3f}")
    print(f"predicted masks: {png}")
    return 0


def predicted_masks(model: nn.Module, ds, path: Path, n: int = 4, title: str | None = None,
                    models: dict[str, nn.Module] | None = None) -> Path:
    """A picture of the first ``n`` images of ``ds``: image, ground truth, predicted mask(s)
    (``models``: several, by name; default ``model`` alone)."""
    import numpy as np
    import torch

    from .measure.segmentation import plot_masks

    models = models or {"prediction": model}
    items = [ds[i] for i in range(min(n, len(ds)))]
    x = torch.stack([it[0] for it in items])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(3, 1, 1)
    images = [(((im * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
              for im in x]
    preds = {}
    with torch.inference_mode():
        for name, m in models.items():
            was = m.training
            m.eval()
            dev = next(m.parameters()).device
            preds[name] = list(m(x.to(dev)).argmax(1).cpu().numpy())
            m.train(was)
    k = int(getattr(ds, "num_classes", None) or model.num_classes)
    return plot_masks(images, [np.asarray(it[1]) for it in items], preds, k, path, title=title,
                      classes=getattr(ds, "classes", None))


def finetune_segmentation(model, data, cfg: Any, eval_data, test_data, spec: dict | None,
                          out: Path, main: bool):
    """:func:`trimtune.tasks.finetune` for ``cfg.task == "segmentation"`` (the caller has
    normalised the config and chosen ``out``). The data are checked before ``out`` is touched."""
    from .checkpoint import run_folder

    task = SegmentationTask(cfg)
    task.check_data(data, eval_data, test_data, cfg.train.seed)
    tc = cfg.train
    with run_folder(out, resume=bool(tc.resume), overwrite=tc.overwrite, main=main) as work:
        # as trimtune.tasks: other DDP processes write nothing and train "into" the same folder
        return _finetune(task, model, data, cfg, eval_data, test_data, spec,
                         work if main else None, final=out if main else work)


def _finetune(task: SegmentationTask, model, data, cfg: Any, eval_data, test_data,
              spec: dict | None, out: Path | None, final: Path):
    import dataclasses

    import torch

    from . import __version__
    from .checkpoint import write_json
    from .data import describe_data
    from .measure.plots import plot_curves
    from .models import set_drop_path_rate
    from .runs import base_spec, run_base_spec, save
    from .finetune_config import FinetuneResult, prepare
    from .train import BestEpoch
    from .train.checkpointing import numerics
    from .train.loop import fit_in
    from .tuners import registry

    tc = cfg.train
    seed = tc.seed
    num_classes = task.num_classes(data, seed)
    if isinstance(model, str) or spec is not None:  # rebuilt by name: the backbone, wrapped
        spec = {**(spec or {"model": model}), "num_classes": None,
                "segmenter": task.segmenter(num_classes)}
    attached = isinstance(model, nn.Module) and registry.method_of(model) is not None
    model = task.build_model(model, num_classes, attached, seed)
    tf_train, tf_eval = task.transforms(model)
    train_ds = task.dataset(data, "train", tf_train, seed)
    eval_ds = task.dataset(eval_data, "val", tf_eval, seed)
    test_ds = task.dataset(test_data, "test", tf_eval, seed)

    spec = run_base_spec(model, spec, out, attached=attached, resume=tc.resume)
    if cfg.drop_path_rate:
        set_drop_path_rate(model.backbone, cfg.drop_path_rate)
    torch.manual_seed(seed)  # adapter init: same seed, same start
    model, callbacks = prepare(model, cfg, total_steps=None)
    best = BestEpoch(task.metric)
    batch = max(32, tc.batch_size)

    def eval_fn(m: nn.Module) -> dict:
        return task.evaluate(m, eval_ds, batch)

    run_base = spec or base_spec(model)
    run_json = {"trimtune_version": __version__, "kind": "finetune", "config": cfg.to_dict(),
                "base": run_base, "data": describe_data(data, train_ds),
                "numerics": {**numerics(), "threads": tc.threads or torch.get_num_threads()}}
    if out and not tc.resume:
        write_json(out / "run.json", run_json)
    settings = {k: v for k, v in cfg.to_dict().items() if k != "train"}
    settings.update(data=describe_data(data, train_ds),
                    val_data=None if eval_ds is None else describe_data(eval_data, eval_ds),
                    base=run_base)
    # the loop writes into the folder run_folder holds: one transaction per run
    tc_run = dataclasses.replace(tc, out_dir=out or final, overwrite=False)
    result = fit_in(out or final, model, train_ds, task.objective(), tc_run,
                    callbacks=[*callbacks, best],
                    eval_fn=eval_fn if eval_ds is not None else None, settings=settings)
    best.restore(model)
    if out and tc.resume:
        write_json(out / "run.json", run_json)
    test = task.test(model, test_ds, batch, out) if test_ds is not None else None
    if out:
        save(model, out / "adapter", method=cfg.method)
        write_json(out / "results.json", task.summary(best.value, test))
        if (out / "metrics.jsonl").is_file():
            plot_curves(out / "metrics.jsonl", out / "curves.png", title=cfg.method)
        for cb in callbacks:
            if hasattr(cb, "plot_history"):
                cb.plot_history(out / "sparsity.png")
    return FinetuneResult(model=model, out_dir=final if out else None,
                          best={task.metric: best.value}, test=test,
                          history=getattr(result, "history", []))


__all__ = ["SegmentationTask", "check_options", "evaluate_command", "finetune_segmentation",
           "predicted_masks"]
