"""The pipeline verbs that join the rooms: load a model from any source, distill, fine-tune,
evaluate, save, merge.

This is the only module (besides the CLI) that imports both the methods (``lowrank``,
``tuners``) and the training loop (``train``): the loop stays method-agnostic, and each
method plugs in an objective or a callback here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import __version__
from .checkpoint import file_sha256, new_run_dir, read_json, read_safetensors, run_folder, write_json, write_safetensors
from .data import build_transform, load_dataset, stratified_choice, train_split_beside
from .errors import TrimtuneError
from .lowrank import DistillConfig, is_compressed, load_compressed, save_compressed, set_trainable
from .lowrank.io import factorise_like
from .measure import evaluate_model
from .measure.plots import plot_confusion, plot_curves
from .models import arch_of, build_from_arch, create_backbone, set_drop_path_rate
from .names import METHODS, SNELL_METHODS
from .train import TrainConfig, fit
from .tuners import (SnellaAllocator, SnellaConfig, SnellConfig, attach, iter_units,
                     load_adapter, prepare_method, save_adapter)
from .tuners import adapter_configs
from .tuners import merge as merge_snell
from .tuners.baselines import merge_method, target_linears
from .tuners.snell_tuner import is_fused_qkv
from .tuners.targets import select_linears


# --------------------------------------------------------------------------- models


def load_model(spec: str | nn.Module, *, num_classes: int | None = None,
               img_size: int | None = None, weights: str | None = None,
               seed: int | None = None) -> nn.Module:
    """A model from a timm / zoo name, a compressed-model or merged-model folder, or a
    fine-tuning run folder (base + adapter). ``num_classes`` replaces the head when it differs;
    ``seed`` seeds torch first, so that new head is the same on every run."""
    if img_size is not None and img_size < 1:
        raise TrimtuneError(f"img_size={img_size}: give a positive resolution that is a "
                            "multiple of the patch size, e.g. 224")
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(spec, nn.Module):
        model = spec
    else:
        path = Path(spec)
        if path.is_dir() and (path / "run.json").is_file():
            model = load_run(path)
        elif path.is_dir() and (path / "trimtune.json").is_file():
            model = load_compressed(path)
        elif path.is_dir():
            raise TrimtuneError(
                f"{path} is a folder but holds neither trimtune.json (a model written by "
                "`trimtune compress/distill/merge`) nor run.json (a `trimtune finetune` run)")
        else:
            model = create_backbone(str(spec), weights=weights, num_classes=num_classes,
                                    img_size=img_size)
        have = _img_size(model)
        if path.is_dir() and img_size is not None and have is not None and have != img_size:
            raise TrimtuneError(f"{path} holds a model for {have} px images, not img_size="
                                f"{img_size}: drop img_size, or start again from the backbone "
                                "name with the new size")
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)
        arch = getattr(model, "trimtune_arch", None)
        if arch is not None:
            arch["kwargs"]["num_classes"] = num_classes
    return model


# --------------------------------------------------------------------------- objectives


class ClassificationObjective:
    """Cross-entropy on labelled batches ``(images, labels)``; label smoothing optional."""

    def __init__(self, label_smoothing: float = 0.0):
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        loss = self.loss(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"ce": loss.detach(), "train_acc": acc}


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
                             img_size=_img_size(student))
    _check_pair(student, teacher)
    ds = _as_dataset(data, "train", build_transform(student, train=False), tc.seed)
    if max_images and max_images < len(ds):
        ds = ds.subset(stratified_choice(ds.targets, max_images, tc.seed))
    set_trainable(student, cfg.trainable)
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "train"}
    settings.update(data=_describe_data(data, ds), teacher=_identity(teacher),
                    student=_identity(student))
    return fit(student, ds, cfg.objective(teacher), tc, settings=settings)


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Distillation matches features block by block: the teacher must have the student's width,
    depth and resolution (it is the model the student was compressed from)."""
    for what, get in (("width", lambda m: getattr(m, "num_features", None)),
                      ("depth (blocks)", lambda m: len(m.blocks) if hasattr(m, "blocks") else None),
                      ("image size", _img_size)):
        s, t = get(student), get(teacher)
        if s is not None and t is not None and s != t:
            raise TrimtuneError(f"teacher {what} {t} != student {what} {s}: distil from the model "
                                "the student was compressed from (same architecture and "
                                "--img-size)")


def _img_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    return pe.img_size[0] if pe is not None and getattr(pe, "img_size", None) else None


# --------------------------------------------------------------------------- finetune


@dataclass
class FinetuneConfig:
    """What to tune and how. ``train`` holds the loop's settings (epochs, lr, batch size...)."""

    method: str = "snella"
    rank: int = 8
    kernel: str | None = None  # default: mixture for snella, piecewise for snell
    sparsity: float = 0.7  # snell: fixed fraction zeroed; snella: the target of the schedule
    init_sparsity: float = 0.0  # snella: fraction zeroed at the start of the schedule
    density: float | None = None  # masked-sparse: fraction of each weight that trains
    protocol: str = "vtab"  # vtab: resize only; fgvc: random-resized crop + flip
    label_smoothing: float = 0.0
    # SNELL / SNELLA regularisation and allocation schedule (trimtune.recipes: "authors" sets
    # 0.1 / 0.1 / 0.1 and an epoch schedule as the released scripts; these are the "fast" ones)
    branch_dropout: float = 0.0  # dropout on the update branch's input (not attn.proj)
    branch_drop_path: float = 0.0  # DropPath on each unit's update (q, k, v independently)
    drop_path_rate: float = 0.0  # backbone stochastic depth (timm's linear decay over blocks)
    schedule_unit: str = "step"  # snella: count the budget schedule in "step"s or "epoch"s
    alloc_interval: int = 1  # snella: reallocate every N schedule units
    t_init: float = 0  # snella: schedule warm-up (count, or fraction of the run if < 1)
    t_final: float = 0  # snella: final phase with the allocation fixed
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=10))
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise TrimtuneError(f"unknown method {self.method!r}; choose one of "
                                f"{', '.join(METHODS)}")
        if self.protocol not in ("vtab", "fgvc"):
            raise TrimtuneError(f"unknown protocol {self.protocol!r}; choose vtab or fgvc")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise TrimtuneError(f"drop-path rate {self.drop_path_rate} is outside [0, 1): use "
                                "e.g. 0.1 (the authors') or 0")
        if self.method in SNELL_METHODS:  # the tuner config checks its own fields, now
            _tuner_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tuner_config(cfg: FinetuneConfig):
    common = {"r": cfg.rank, "dropout": cfg.branch_dropout, "drop_path": cfg.branch_drop_path,
              **cfg.method_kwargs}  # explicit method_kwargs win
    if cfg.kernel:
        common["kernel"] = cfg.kernel
    if cfg.method == "snell":
        return SnellConfig(sparsity=cfg.sparsity, **common)
    return SnellaConfig(target_sparsity=cfg.sparsity, init_sparsity=cfg.init_sparsity,
                        schedule_unit=cfg.schedule_unit, interval=cfg.alloc_interval,
                        t_init=cfg.t_init, t_final=cfg.t_final, **common)


def check_rank(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Refuse a rank above ``min(d_in, d_out)`` of a target layer (a SNELL / SNELLA unit, a
    LoRA / DoRA / AdaLoRA linear): it only adds memory (r x (d_in + d_out) per layer), never
    expressiveness, and a huge one exhausts the machine before the first step."""
    if cfg.method in SNELL_METHODS:
        tcfg = _tuner_config(cfg)
        layers = []
        for name in select_linears(model, tcfg.target_modules, exclude=tcfg.exclude_modules,
                                   modules_to_save=tcfg.modules_to_save):
            lin = model.get_submodule(name)
            split = 3 if tcfg.split_qkv and is_fused_qkv(name) and lin.out_features % 3 == 0 \
                else 1
            layers.append((name, lin.in_features, lin.out_features // split))
        rank = cfg.rank
    elif cfg.method in ("lora", "dora", "adalora"):
        layers = [(n, m.in_features, m.out_features) for n in
                  target_linears(model, cfg.method_kwargs.get("target_modules"))
                  for m in [model.get_submodule(n)]]
        rank = cfg.method_kwargs.get("init_r") or (
            math.ceil(1.5 * cfg.rank) if cfg.method == "adalora" else cfg.rank)
    else:
        return
    if rank < 1:
        raise TrimtuneError(f"rank={cfg.rank}: give a rank of 1 or more, e.g. 8")
    name, d_in, d_out = min(layers, key=lambda t: min(t[1], t[2]))
    if rank > min(d_in, d_out):
        raise TrimtuneError(
            f"rank {rank} is above min(d_in, d_out) = {min(d_in, d_out)} of target layer {name} "
            f"({d_in} -> {d_out}{' per unit' if cfg.method in SNELL_METHODS else ''}): it would "
            f"only add memory; use --rank {min(d_in, d_out)} or less")


def prepare(model: nn.Module, cfg: FinetuneConfig, *, total_steps: int | None = None
            ) -> tuple[nn.Module, list]:
    """Freeze the base and add the method's trainable parts; returns (model, callbacks).
    A rank above a target's ``min(d_in, d_out)`` is refused first (:func:`check_rank`)."""
    check_rank(model, cfg)
    if cfg.method in SNELL_METHODS:
        tcfg = _tuner_config(cfg)
        attach(model, tcfg)
        callbacks = [SnellaAllocator(model, tcfg, total_steps=total_steps)] \
            if cfg.method == "snella" else []
        return model, callbacks
    kw = dict(cfg.method_kwargs)
    if cfg.method == "masked-sparse":
        kw["density"] = cfg.density if cfg.density is not None else 1.0 - cfg.sparsity
    if cfg.method == "adalora" and total_steps:
        kw["total_step"] = total_steps
    return prepare_method(model, cfg.method, rank=cfg.rank, **kw)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k in names or _is_method_buffer(k)}


def _is_method_buffer(key: str) -> bool:
    # masks / kernel constants that belong to the adapter, not to the base model
    return any(t in key for t in ("snell_", "lora_", "grad_mask", "kernel."))


@dataclass
class FinetuneResult:
    model: nn.Module
    out_dir: Path | None
    best: dict | None
    test: dict | None
    history: list


class BestEpoch:
    """Best-validation selection state: the trainable tensors, the SNELLA per-unit sparsities
    (the mask depends on them too) and the value. Passed to the loop as a callback only for
    its ``state_dict``: every checkpoint holds it, so a resumed run selects and saves exactly
    what an uninterrupted one does."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.sparsity: dict[str, float] | None = None

    def update(self, model: nn.Module, value: float) -> None:
        if self.value is None or value > self.value:
            self.value, self.state = value, _trainable_state(model)
            self.sparsity = {n: u.sparsity for n, u in iter_units(model)}

    def restore(self, model: nn.Module) -> None:
        """Load the best weights (and sparsities) into ``model``; a no-op before any eval."""
        if self.state is None:
            return
        model.load_state_dict(self.state, strict=False)
        for n, u in iter_units(model):
            u.sparsity = self.sparsity[n]

    def state_dict(self) -> dict:
        return {"value": self.value, "state": self.state, "sparsity": self.sparsity}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.state, self.sparsity = d["value"], d["state"], d["sparsity"]


def finetune(model: nn.Module | str, data: Dataset | str, config: FinetuneConfig | None = None,
             *, eval_data: Dataset | str | None = None, test_data: Dataset | str | None = None,
             base_spec: dict | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with ``config.method``.

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
    cfg = config or FinetuneConfig()
    tc = cfg.train
    seed = tc.seed
    main = int(os.environ.get("RANK", "0")) == 0  # under DDP only rank 0 writes the run folder
    out = Path(tc.out_dir) if tc.out_dir is not None else new_run_dir()
    if isinstance(data, str) and isinstance(eval_data, str):
        data = disjoint_train(data, eval_data)
    with run_folder(out, resume=bool(tc.resume), overwrite=tc.overwrite, main=main) as work:
        return _finetune(model, data, cfg, eval_data, test_data, base_spec, work if main else None,
                         final=out)


def disjoint_train(data: str, eval_data: str) -> str:
    """``data`` with its split changed so that it does not contain ``eval_data`` (see
    :func:`trimtune.data.train_split_beside`); prints a note when it changed."""
    name, split = split_spec(data, "train")
    vname, vsplit = split_spec(eval_data, "val")
    other = train_split_beside(name, split, vname, vsplit)
    if other is None:
        return data
    print(f"note: validation {eval_data} is held out of {data}; training on {name}@{other} "
          "(the rest) so that selection never sees training images")
    return f"{name}@{other}"


def _finetune(model, data, cfg: FinetuneConfig, eval_data, test_data, base_spec,
              out: Path | None, final: Path | None) -> FinetuneResult:
    tc = cfg.train
    seed = tc.seed
    probe = _as_dataset(data, "train", None, seed)
    _check_trainable_data(probe, data)
    # the new head (when the class count differs) is part of the run: seeded like the rest
    if isinstance(model, str):
        base_spec = base_spec or {"model": model, "num_classes": probe.num_classes}
    model = load_model(model, num_classes=probe.num_classes, seed=seed)
    tf_train = build_transform(model, train=True, protocol=cfg.protocol)
    tf_eval = build_transform(model, train=False, protocol=cfg.protocol)
    train_ds = _as_dataset(data, "train", tf_train, seed)
    eval_ds = _as_dataset(eval_data, "val", tf_eval, seed)
    test_ds = _as_dataset(test_data, "test", tf_eval, seed)

    base_spec = _with_identity(base_spec)
    if out and base_spec is None:
        # an in-memory base (e.g. compressed + distilled) cannot be rebuilt from a name: keep
        # its weights in the run folder so load_model(run_dir) gives back the tuned model;
        # their hash is compared on resume (the folder is not rewritten before that)
        if not (tc.resume and (out / "base").is_dir()):
            save_model(model, out / "base")
        base_spec = {"model": "base", "weights_sha256": _state_sha256(model)}
    # the schedules (SNELLA allocator, AdaLoRA) take the loop's total steps (epochs x whole
    # steps per epoch x processes): max_steps only stops early, so a resumed run matches
    if cfg.drop_path_rate:
        set_drop_path_rate(model, cfg.drop_path_rate)
    torch.manual_seed(seed)  # adapter init: same seed, same start (and on every DDP rank)
    model, callbacks = prepare(model, cfg, total_steps=None)

    best = BestEpoch()

    def eval_fn(m: nn.Module) -> dict:
        r = evaluate_model(m, eval_ds, batch_size=max(64, tc.batch_size), progress=False)
        best.update(m, r.top1)
        return {"val_acc": r.top1}

    run_base = base_spec or _base_spec(model)
    run_json = {"trimtune_version": __version__, "kind": "finetune", "config": cfg.to_dict(),
                "base": run_base, "data": _describe_data(data, train_ds)}
    if out and not tc.resume:  # a resume rewrites it only once its settings were accepted
        write_json(out / "run.json", run_json)
    # what changes the result besides the loop's own settings: compared on resume
    settings = {k: v for k, v in cfg.to_dict().items() if k != "train"}
    settings.update(data=_describe_data(data, train_ds),
                    val_data=None if eval_ds is None else _describe_data(eval_data, eval_ds),
                    base=run_base)
    tc_run = dataclasses.replace(tc, out_dir=out or final, overwrite=False)
    result = fit(model, train_ds, ClassificationObjective(cfg.label_smoothing), tc_run,
                 callbacks=[*callbacks, best], eval_fn=eval_fn if eval_ds is not None else None,
                 settings=settings)
    best.restore(model)
    if out and tc.resume:
        write_json(out / "run.json", run_json)
    test = None
    if test_ds is not None:
        r = evaluate_model(model, test_ds, batch_size=max(64, tc.batch_size))
        test = r.to_dict()
        if out:
            plot_confusion(r.confusion, r.classes, out / "confusion.png",
                           title=f"{cfg.method}: test top-1 {r.top1:.3f}")
    if out:
        save(model, out / "adapter", method=cfg.method)
        summary = {"best_val_acc": best.value, "test_top1": test and test["top1"],
                   "test": test}
        write_json(out / "results.json", summary)
        if (out / "metrics.jsonl").is_file():
            plot_curves(out / "metrics.jsonl", out / "curves.png", title=cfg.method)
        for cb in callbacks:
            if hasattr(cb, "plot_history"):
                cb.plot_history(out / "sparsity.png")
    return FinetuneResult(model=model, out_dir=final if out else None,
                          best={"val_acc": best.value}, test=test,
                          history=getattr(result, "history", []))


def _check_trainable_data(ds, spec) -> None:
    """A classifier needs two classes or more: refuse a one-class dataset before training."""
    n = getattr(ds, "num_classes", None)
    if n is not None and n < 2:
        name = spec if isinstance(spec, str) else getattr(ds, "spec", type(ds).__name__)
        raise TrimtuneError(f"{name} has {n} class: fine-tuning a classifier needs 2 or more "
                            "(an ImageFolder needs one sub-folder per class)")


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
    """``"fashion-mnist:1k@val"`` -> ``("fashion-mnist:1k", "val")``."""
    name, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    return name, split or default_split


def _as_dataset(data, split: str, transform, seed: int = 0) -> Dataset | None:
    if data is None or not isinstance(data, str):
        return data
    name, split = split_spec(data, split)
    return load_dataset(name, split, transform=transform, seed=seed)


def _describe_data(spec, ds) -> dict:
    return {"spec": spec if isinstance(spec, str) else getattr(ds, "spec", type(ds).__name__),
            "num_images": len(ds), "num_classes": getattr(ds, "num_classes", None)}


def _state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): an in-memory base's id."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _base_files(spec: dict) -> list[Path]:
    """The files a base named in run.json is read from (a model folder's weights, --weights)."""
    files = []
    if spec.get("model") and (Path(spec["model"]) / "model.safetensors").is_file():
        files.append(Path(spec["model"]) / "model.safetensors")
    if spec.get("weights") and Path(spec["weights"]).is_file():
        files.append(Path(spec["weights"]))
    return files


def _with_identity(spec: dict | None) -> dict | None:
    """``spec`` plus the SHA-256 of the files the base is read from: a base replaced after
    fine-tuning is then refused when the run is loaded (and on resume)."""
    if spec is None:
        return None
    spec = dict(spec)
    files = _base_files(spec)
    if files:
        spec["sha256"] = {str(f): file_sha256(f) for f in files}
    return spec


def _check_identity(spec: dict, run_dir: Path) -> None:
    for f, digest in (spec.get("sha256") or {}).items():
        if not Path(f).is_file():
            raise TrimtuneError(f"the base of {run_dir} is gone: {f} not found; restore it "
                                "(run.json names it)")
        now = file_sha256(f)
        if now != digest:
            raise TrimtuneError(f"the base {f} changed since {run_dir} was trained (sha256 "
                                f"{digest[:12]} -> {now[:12]}): restore the original base, or "
                                "fine-tune again on the new one")


def _identity(model: nn.Module) -> dict:
    """What a resume compares about a model: its architecture record, or its class and size."""
    try:
        return _base_spec(model)
    except TrimtuneError:
        return {"class": type(model).__name__,
                "num_params": sum(p.numel() for p in model.parameters())}


def _base_spec(model: nn.Module) -> dict:
    if is_compressed(model):
        return {"arch": arch_of(model), "compressed": model.trimtune_lowrank}
    return {"arch": arch_of(model)}


# --------------------------------------------------------------------------- save / load / merge


def _has_snell(model: nn.Module) -> bool:
    return any(isinstance(c, SnellConfig) for c in adapter_configs(model).values())


def save(model: nn.Module, out_dir: str | Path, *, method: str | None = None) -> Path:
    """Adapter-only save. SNELL / SNELLA: the PEFT-style adapter folder of ``tuners``; other
    methods: their trainable tensors (LoRA factors, masks, biases, head...) in the same two
    files, enough to rebuild them on top of the base recorded in run.json."""
    out_dir = Path(out_dir)
    if _has_snell(model):
        return save_adapter(model, out_dir)
    state = _trainable_state(model)
    write_safetensors(out_dir / "adapter_model.safetensors", state,
                      metadata={"format": "pt", "trimtune_version": __version__})
    write_json(out_dir / "adapter_config.json", {
        "method": method, "base": _base_spec(model), "num_tensors": len(state),
        "num_parameters": int(sum(v.numel() for v in state.values())),
        "trimtune_version": __version__})
    return out_dir


def load_run(run_dir: str | Path) -> nn.Module:
    """Rebuild a fine-tuned model from a run folder: base + method + adapter tensors."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    try:
        cfg_d = dict(run["config"])
        cfg_d["train"] = TrainConfig(**cfg_d["train"])
        cfg = FinetuneConfig(**cfg_d)
        base = run["base"]
    except (KeyError, TypeError) as e:
        raise TrimtuneError(f"{run_dir / 'run.json'} is incomplete or from another version "
                            f"({e}); re-run `trimtune finetune`") from e
    if "model" in base:
        spec = base["model"]
        if (run_dir / spec).is_dir():  # the base kept inside the run folder
            spec = str(run_dir / spec)
        _check_identity(base, run_dir)
        model = load_model(spec, num_classes=base.get("num_classes"),
                           img_size=base.get("img_size"), weights=base.get("weights"))
    else:
        model = build_from_arch(base["arch"])
        if base.get("compressed"):
            factorise_like(model, base["compressed"]["ranks"])
    adapter = run_dir / "adapter"
    try:
        if cfg.method in SNELL_METHODS:
            load_adapter(model, adapter)
        else:
            state = read_safetensors(adapter / "adapter_model.safetensors")
            model, _ = prepare(model, cfg, total_steps=1)
            _, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise TrimtuneError(f"adapter in {run_dir} does not fit its base: unexpected "
                                    f"tensors {unexpected[:5]}; was run.json edited?")
    except RuntimeError as e:  # torch: size mismatch of a tensor
        shape = str(e).split("size mismatch for ", 1)[-1].split("\n")[0][:160]
        raise TrimtuneError(f"adapter in {run_dir} does not fit the base {base.get('model', '')}"
                            f" ({shape}): the base is not the model this run was trained on; "
                            "restore that base or fine-tune again") from e
    model.eval()
    return model


def merge(model: nn.Module, method: str | None = None) -> nn.Module:
    """Fold the fine-tuned update into the base weights: a plain model, no extra cost."""
    if method in SNELL_METHODS or _has_snell(model):
        return merge_snell(model)
    return merge_method(model, method)


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """A plain (merged or compressed) model folder: model.safetensors + trimtune.json."""
    return save_compressed(model, out_dir, allow_dense=True)


# --------------------------------------------------------------------------- benchmarks


def build_train_step(model: str, *, method: str = "snella", rank: int = 8,
                     batch_size: int = 8, num_classes: int = 10, img_size: int | None = None,
                     weights: str | None = None, pretrained: bool = True,
                     compress_ratio: float | None = None, sparsity: float = 0.7,
                     device: str | None = None, seed: int = 0,
                     target_modules: str | None = None):
    """Build ``(model, step_fn)`` for the memory / speed benchmarks: one AdamW training step
    of ``method`` on a random batch (what a real step allocates: activations kept for
    backward, gradients, optimizer state). Used by ``trimtune.measure.memory``.

    For SNELLA the step also runs what :func:`trimtune.train.fit` runs after every optimizer
    step: the allocator callback (importance EMA update and, with ``schedule_unit="step"``,
    the cross-layer reallocation), so its time and memory are part of the figure.
    ``target_modules`` (SNELL / SNELLA) replaces the default target patterns."""
    torch.manual_seed(seed)
    if Path(model).is_dir():
        m = load_model(model, num_classes=num_classes)
    else:
        m = create_backbone(model, pretrained=pretrained, weights=weights,
                            num_classes=num_classes, img_size=img_size)
    if compress_ratio:
        from .lowrank import compress
        m = compress(m, ratio=compress_ratio, inplace=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m.to(dev)
    extra = {"target_modules": target_modules} if target_modules else {}
    m, callbacks = prepare(m, FinetuneConfig(method=method, rank=rank, sparsity=sparsity,
                                             method_kwargs=extra), total_steps=100)
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

    def step() -> None:
        for cb in callbacks:
            if hasattr(cb, "on_step_start"):
                cb.on_step_start(state)
        loss = loss_fn(m(x), y)
        loss.backward()
        opt.step()
        state.step += 1
        for cb in callbacks:  # before zero_grad: the allocator reads the gradients
            if hasattr(cb, "after_optimizer_step"):
                cb.after_optimizer_step(state)
        opt.zero_grad(set_to_none=True)

    return m, step
