"""On-disk dataset formats: ImageFolder, VTAB-1k split lists, FGVC JSON annotations.

Each reader returns the *official* splits it finds as ``{split_name: loader}`` where the
loader is a zero-argument callable building a :class:`~trimtune.data.datasets.FileDataset`
(nothing is read before a split is asked for). Labels are shared across the splits of one
root, so class ``i`` means the same thing in train and test.

* ImageFolder (``PATH`` or ``imagefolder:PATH``): ``PATH/<class>/<image>``, or split
  sub-folders ``PATH/train``, ``PATH/val``, ``PATH/test`` each holding class folders
  (read with torchvision's ImageFolder helpers; class names = folder names, sorted).
* VTAB-1k (``vtab:ROOT``), the layout of the public VTAB-1k release used by NOAH / SNELL /
  SPT: ``ROOT/images/...`` and list files ``train800.txt``, ``val200.txt``,
  ``train800val200.txt``, ``test.txt`` with lines ``"images/train/0.jpg 3"`` (path relative to
  ROOT, integer label).
* FGVC (``fgvc:ROOT``), the layout of the VPT / SNELL FGVC release: ``train.json``,
  ``val.json``, ``test.json`` each mapping a relative image path to a class id; images live
  under ``ROOT/images`` (CUB, NABirds), ``ROOT/Images`` (Stanford Dogs) or ``ROOT`` (Cars,
  Flowers). Class ids are mapped to contiguous labels in sorted order, over all three files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import TrimtuneError
from .datasets import FileDataset

SplitLoaders = dict[str, Callable[[], FileDataset]]
SPLIT_DIRS = ("train", "val", "test")
VTAB_LISTS = {"train800val200": "train800val200.txt", "train800": "train800.txt",
              "val200": "val200.txt", "test": "test.txt"}
FGVC_IMAGE_DIRS = ("images", "Images", ".")


def _require_dir(root: Path, form: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TrimtuneError(f"dataset folder {root} not found: check the path given as {form}")
    return root


# ----------------------------------------------------------------------------- ImageFolder
def imagefolder_splits(root: str | Path, spec: str = "") -> SplitLoaders:
    """Official splits of an ImageFolder tree (see module docstring)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = _require_dir(root, "imagefolder:PATH")
    split_dirs = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}
    classes: set[str] = set()
    for d in split_dirs.values():
        try:
            classes.update(find_classes(str(d))[0])
        except FileNotFoundError:
            pass
    if not classes:
        raise TrimtuneError(f"{root} holds no class folders: expected PATH/<class>/<image> or "
                            "PATH/{train,val,test}/<class>/<image>")
    class_names = sorted(classes)
    class_to_idx = {c: i for i, c in enumerate(class_names)}

    def load(split: str) -> FileDataset:
        d = split_dirs[split]
        present = {c: i for c, i in class_to_idx.items() if (d / c).is_dir()}
        samples = make_dataset(str(d), present, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise TrimtuneError(f"{d} holds no images ({', '.join(IMG_EXTENSIONS)}); add images "
                                "under <class>/ folders")
        return FileDataset(samples, class_names, spec=spec, split=split)

    return {s: partial(load, s) for s in split_dirs}


# ----------------------------------------------------------------------------- VTAB-1k
def _read_list(path: Path, root: Path) -> list[tuple[str, int]]:
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise TrimtuneError(f"{path} line {n} is {line!r}: expected 'relative/path.jpg LABEL'")
        samples.append((str(root / parts[0]), int(parts[1])))
    return samples


def vtab_splits(root: str | Path, spec: str = "") -> SplitLoaders:
    """Official splits of a VTAB-1k task folder: train800val200, train800, val200, test."""
    root = _require_dir(root, "vtab:ROOT")
    present = {s: root / f for s, f in VTAB_LISTS.items() if (root / f).is_file()}
    if not present:
        raise TrimtuneError(f"{root} has none of {', '.join(VTAB_LISTS.values())}: point vtab: at "
                            "one VTAB-1k task folder (e.g. vtab-1k/cifar)")
    lists = {s: _read_list(p, root) for s, p in present.items()}
    num_classes = 1 + max(label for samples in lists.values() for _, label in samples)
    classes = [str(i) for i in range(num_classes)]

    def load(split: str) -> FileDataset:
        return FileDataset(lists[split], classes, spec=spec, split=split)

    return {s: partial(load, s) for s in VTAB_LISTS if s in lists}


# ----------------------------------------------------------------------------- FGVC (VPT json)
def _fgvc_class_names(annos: dict[str, dict[str, object]], class_ids: list) -> list[str]:
    """Class names from the image folders when each class has its own folder, else the ids."""
    folders: dict[object, set[str]] = {c: set() for c in class_ids}
    for anno in annos.values():
        for rel, cid in anno.items():
            folders[cid].add(Path(rel).parts[0] if len(Path(rel).parts) > 1 else "")
    names = [next(iter(folders[c])) if len(folders[c]) == 1 else "" for c in class_ids]
    if all(names) and len(set(names)) == len(names):
        return names
    return [str(c) for c in class_ids]


def fgvc_splits(root: str | Path, spec: str = "") -> SplitLoaders:
    """Official splits of an FGVC folder in the VPT JSON format: train, val, test."""
    root = _require_dir(root, "fgvc:ROOT")
    annos: dict[str, dict[str, object]] = {}
    for split in SPLIT_DIRS:
        path = root / f"{split}.json"
        if path.is_file():
            try:
                anno = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise TrimtuneError(f"{path} is not valid JSON ({e}); re-create it") from e
            if not isinstance(anno, dict):
                raise TrimtuneError(f"{path} must map 'relative/image.jpg' to a class id")
            annos[split] = anno
    if not annos:
        raise TrimtuneError(f"{root} has no train.json / val.json / test.json: point fgvc: at a "
                            "folder in the VPT FGVC format")
    class_ids = sorted({cid for anno in annos.values() for cid in anno.values()},
                       key=lambda c: (isinstance(c, str), c))
    cont = {cid: i for i, cid in enumerate(class_ids)}
    classes = _fgvc_class_names(annos, class_ids)
    first = next(iter(next(iter(annos.values()))))
    image_dir = next((root / d for d in FGVC_IMAGE_DIRS if (root / d / first).is_file()), None)
    if image_dir is None:
        tried = ", ".join(str(root / d / first) for d in FGVC_IMAGE_DIRS)
        raise TrimtuneError(f"image {first!r} of {root} not found (tried {tried}); put the images "
                            "under ROOT/images, ROOT/Images or ROOT")

    def load(split: str) -> FileDataset:
        samples = [(str(image_dir / rel), cont[cid]) for rel, cid in annos[split].items()]
        return FileDataset(samples, classes, spec=spec, split=split)

    return {s: partial(load, s) for s in annos}
