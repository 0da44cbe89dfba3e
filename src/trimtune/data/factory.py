"""``load_dataset(spec, split, transform, seed)``: one entry point for every data source.

Accepted specs:

* built-ins ``digits``, ``fashion-mnist``, ``mnist-5k``, ``synthetic`` (see
  :mod:`trimtune.data.builtin`); ``synthetic:classes=4,n=64,test=64,size=32`` sets options;
* few-shot form ``NAME:K`` of a built-in, ``K`` an integer with optional ``k`` (``:1k``,
  ``:500``, ``:10k``): ``K`` class-stratified training images chosen by ``seed`` (VTAB-1k
  convention);
* ``imagefolder:PATH`` or a folder ``PATH`` (a plain folder holding ``train800val200.txt`` is
  read as VTAB-1k, one holding ``train.json`` as FGVC);
* ``vtab:ROOT`` (VTAB-1k list files) and ``fgvc:ROOT`` (VPT FGVC JSON);
* ``seg:PATH``: semantic segmentation, the ADE20K / mmseg layout (image / mask pairs, see
  :mod:`trimtune.data.segmentation`).

Splits:

============================  ===================================================================
few-shot ``NAME:K``           ``train`` (alias ``trainval``, ``train800val200``) = the K-shot set
                              (VTAB trains on all of it); ``train800`` (``train80``) = a stratified
                              seeded 80 % of it; ``val`` (``val200``, ``val20``) = the other 20 %;
                              ``test`` = the full official test set.
built-ins, ImageFolder        ``train`` = the full official train set; ``test``; ``val`` = the
without a val folder          official val set if there is one, else a stratified seeded 10 %
                              subset *of train* (so ``train`` still contains it: to train and
                              select on disjoint data use ``train90`` + ``val``).
VTAB-1k                       ``train`` = train800val200, ``train800``, ``val`` = val200, ``test``.
FGVC, ImageFolder with val    ``train``, ``val``, ``test`` as on disk; ``trainval`` = train + val.
============================  ===================================================================

``seed`` chooses the few-shot set and the val hold-out; the official test sets never depend on
it (synthetic data aside, whose noise it draws).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import TrimtuneError
from .builtin import BUILTIN_INFO, builtin_split
from .datasets import FileDataset, LabeledDataset, Transform, stratified_choice, stratified_split
from .formats import fgvc_splits, imagefolder_splits, vtab_splits
from .segmentation import SegDataset, read_classes, seg_splits

VAL_FRACTION = 0.1  # held-out fraction of "train" for split "val" when there is no official val
FEWSHOT_VAL_FRACTION = 0.2  # train800 / val200 of a K-shot set
PREFIXES = ("imagefolder", "vtab", "fgvc", "seg")
FEWSHOT_RE = re.compile(r"^(\d+)([kK]?)$")
FORMS = ("digits, fashion-mnist, mnist-5k, synthetic; few-shot NAME:1k / NAME:500; "
         "synthetic:classes=4,n=64,size=32; imagefolder:PATH or a folder; vtab:ROOT; fgvc:ROOT; "
         "seg:PATH")

FEWSHOT_SPLITS = {"train": "train", "trainval": "train", "train800val200": "train",
                  "train800": "train800", "train80": "train800",
                  "val": "val", "val200": "val", "val20": "val", "test": "test"}
VTAB_ALIASES = {"train": "train800val200", "trainval": "train800val200", "val": "val200"}


def _unknown(spec: str) -> TrimtuneError:
    name = spec.split(":", 1)[0]
    close = difflib.get_close_matches(name, list(BUILTIN_INFO) + list(PREFIXES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return TrimtuneError(f"unknown dataset {spec!r}.{hint} Use one of: {FORMS} "
                         "(`trimtune datasets` lists the built-ins)")


def parse_spec(spec: str | Path) -> tuple[str, str, int | None]:
    """Split a dataset spec into ``(kind, argument, fewshot_k)``.

    ``kind`` is a built-in name or one of ``imagefolder``, ``vtab``, ``fgvc``; ``argument`` is
    the synthetic options or the root folder; ``fewshot_k`` is None unless ``NAME:K`` was given.
    """
    text = str(spec).strip()
    if not text:
        raise _unknown(text)
    name, sep, arg = text.partition(":")
    if name.lower() in BUILTIN_INFO:
        name = name.lower()
        if not sep:
            return name, "", None
        m = FEWSHOT_RE.match(arg.strip())
        if m:
            k = int(m.group(1)) * (1000 if m.group(2) else 1)
            if k < 1:
                raise TrimtuneError(f"few-shot size in {text!r} must be >= 1, e.g. {name}:1k")
            return name, "", k
        if name == "synthetic":
            return name, arg, None
        raise TrimtuneError(f"bad few-shot size {arg!r} in {text!r}: use an integer with optional "
                            f"k, e.g. {name}:1k or {name}:500")
    if sep and name.lower() in PREFIXES:
        if not arg.strip():
            raise TrimtuneError(f"{text!r} names no folder: write {name.lower()}:PATH")
        return name.lower(), arg.strip(), None
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "train800val200.txt").is_file() or (path / "train800.txt").is_file():
            return "vtab", text, None
        if (path / "train.json").is_file():
            return "fgvc", text, None
        return "imagefolder", text, None
    if "/" in text or "\\" in text or text.startswith("."):
        raise TrimtuneError(f"dataset folder {text!r} not found: check the path (or use a "
                            f"built-in: {', '.join(BUILTIN_INFO)})")
    raise _unknown(text)


def _official_splits(kind: str, arg: str, seed: int, spec: str
                     ) -> dict[str, Callable[[], LabeledDataset]]:
    if kind in BUILTIN_INFO:
        return {s: (lambda s=s: builtin_split(kind, s, seed=seed, options=arg))
                for s in ("train", "test")}
    readers = {"imagefolder": imagefolder_splits, "vtab": vtab_splits, "fgvc": fgvc_splits,
               "seg": seg_splits}
    return readers[kind](arg, spec=spec)


def _no_split(spec: str, split: str, accepted: list[str]) -> TrimtuneError:
    return TrimtuneError(f"dataset {spec!r} has no split {split!r}: use one of "
                         f"{', '.join(accepted)}")


def _concat(a: LabeledDataset, b: LabeledDataset, split: str) -> LabeledDataset:
    if isinstance(a, SegDataset):
        return SegDataset(a.samples + b.samples, a.root, read_classes(a.root), spec=a.spec,
                          split=split)
    assert isinstance(a, FileDataset) and isinstance(b, FileDataset)
    return FileDataset(a.samples + b.samples, a.classes, spec=a.spec, split=split, loader=a.loader)


def _select(spec: str, kind: str, official: dict[str, Callable[[], LabeledDataset]],
            split: str, k: int | None, seed: int) -> LabeledDataset:
    if k is not None:  # few-shot: everything but test comes from the K-shot set
        if split not in FEWSHOT_SPLITS:
            raise _no_split(spec, split, list(FEWSHOT_SPLITS))
        part = FEWSHOT_SPLITS[split]
        if part == "test":
            return official["test"]()
        full = official["train"]()
        if k > len(full):
            raise TrimtuneError(f"{spec!r} asks for {k} training images but {kind} has only "
                                f"{len(full)}: use a smaller K")
        shot = full.subset(stratified_choice(full.targets, k, seed), split=split)
        if part == "train":
            return shot
        kept, held = stratified_split(shot.targets, FEWSHOT_VAL_FRACTION, seed)
        return shot.subset(kept if part == "train800" else held, split=split)

    name = VTAB_ALIASES.get(split, split) if kind == "vtab" else split
    if name in official:
        return official[name]()
    accepted = list(official) + (list(VTAB_ALIASES) if kind == "vtab" else [])
    if kind != "vtab" and "train" in official:
        if "val" in official:
            accepted.append("trainval")
            if split == "trainval":
                return _concat(official["train"](), official["val"](), split)
        else:
            accepted += ["val", "train90", "trainval"]
            if split in ("val", "train90", "trainval"):
                train = official["train"]()
                if split == "trainval":
                    return train
                kept, held = stratified_split(train.targets, VAL_FRACTION, seed)
                return train.subset(held if split == "val" else kept, split=split)
    raise _no_split(spec, split, accepted)


def train_split_beside(name: str, split: str, val_name: str, val_split: str) -> str | None:
    """The split to train on instead of ``split`` when validating on ``val_name@val_split``
    would otherwise select on training images; None when they are already disjoint.

    ``X:1k`` (the whole K-shot set) beside ``X:1k@val`` -> ``train800``; a VTAB-1k folder's
    ``train`` (train800val200) beside its ``val200`` -> ``train800``; a built-in or ImageFolder
    ``train`` beside the ``val`` held out of it (no official val) -> ``train90``.
    """
    if name.strip() != val_name.strip():
        return None
    kind, arg, k = parse_spec(name)
    if k is not None:
        whole = FEWSHOT_SPLITS.get(split) == "train"
        return "train800" if whole and FEWSHOT_SPLITS.get(val_split) == "val" else None
    if kind == "vtab":
        whole = VTAB_ALIASES.get(split, split) == "train800val200"
        return "train800" if whole and VTAB_ALIASES.get(val_split, val_split) == "val200" else None
    if split not in ("train", "trainval") or val_split != "val":
        return None
    if kind in BUILTIN_INFO:
        return "train90"
    official = _official_splits(kind, arg, 0, name)
    return "train90" if "train" in official and "val" not in official else None


def load_dataset(spec: str | Path, split: str = "train", transform: Transform | None = None,
                 seed: int = 0) -> LabeledDataset:
    """Load a dataset split as a torch ``Dataset`` of ``(image, label)`` pairs.

    Args:
        spec: what to load (see the module docstring): ``"digits"``, ``"fashion-mnist:1k"``,
            ``"synthetic:classes=4,n=64"``, ``"vtab:/data/vtab-1k/cifar"``, a folder path...
        split: ``"train"``, ``"val"``, ``"test"``, or a form-specific one (``"train800"``,
            ``"train90"``, ``"trainval"``...).
        transform: applied to the PIL RGB image; None yields the PIL image itself.
        seed: chooses the few-shot images and the val hold-out (reproducible).

    Returns:
        A dataset with ``.num_classes``, ``.classes``, ``.targets``, ``.spec`` and ``.split``;
        ``dataset[i]`` is ``(transform(image) or PIL.Image (RGB), int label)``.
    """
    spec_text = str(spec)
    kind, arg, k = parse_spec(spec_text)
    official = _official_splits(kind, arg, seed, spec_text)
    ds = _select(spec_text, kind, official, str(split), k, seed)
    ds.spec, ds.split, ds.transform = spec_text, str(split), transform
    return ds


def split_spec(spec: str, default_split: str) -> tuple[str, str]:
    """``"fashion-mnist:1k@val"`` -> ``("fashion-mnist:1k", "val")``."""
    name, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
    return name, split or default_split


def as_dataset(data, split: str, transform: Transform | None, seed: int = 0):
    """``data`` itself when it is a dataset (or None), else :func:`load_dataset` of the spec
    ``"NAME[@SPLIT]"`` (``split`` when the spec names none)."""
    if data is None or not isinstance(data, str):
        return data
    name, split = split_spec(data, split)
    return load_dataset(name, split, transform=transform, seed=seed)


def describe_data(spec, ds) -> dict:
    """``{"spec", "num_images", "num_classes"}`` of a dataset (for run records)."""
    return {"spec": spec if isinstance(spec, str) else getattr(ds, "spec", type(ds).__name__),
            "num_images": len(ds), "num_classes": getattr(ds, "num_classes", None)}


def check_classes(ds, spec) -> None:
    """A classifier needs two classes or more: refuse a one-class dataset before training."""
    n = getattr(ds, "num_classes", None)
    if n is not None and n < 2:
        name = spec if isinstance(spec, str) else getattr(ds, "spec", type(ds).__name__)
        raise TrimtuneError(f"{name} has {n} class: fine-tuning a classifier needs 2 or more "
                            "(an ImageFolder needs one sub-folder per class)")


def disjoint_train(data: str, eval_data: str) -> str:
    """``data`` with its split changed so that it does not contain ``eval_data`` (see
    :func:`train_split_beside`); prints a note when it changed."""
    name, split = split_spec(data, "train")
    vname, vsplit = split_spec(eval_data, "val")
    other = train_split_beside(name, split, vname, vsplit)
    if other is None:
        return data
    print(f"note: validation {eval_data} is held out of {data}; training on {name}@{other} "
          "(the rest) so that selection never sees training images")
    return f"{name}@{other}"
