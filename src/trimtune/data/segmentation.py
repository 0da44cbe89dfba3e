"""Semantic segmentation data: the ADE20K / mmsegmentation folder layout (``seg:PATH``) and
joint image / mask transforms.

Layout (mmsegmentation's ``ADE20KDataset``)::

    PATH/images/training/*.jpg|png        PATH/annotations/training/*.png     (split "train")
    PATH/images/validation/*.jpg|png      PATH/annotations/validation/*.png   ("val", optional)
    PATH/images/test/*.jpg|png            PATH/annotations/test/*.png         ("test", optional)
    PATH/classes.txt                      optional: one class name per line, line i = label i

An annotation is an index PNG (mode ``L`` or ``P``) with the image's stem and size; its pixel
values are the labels, 255 the ignore index. ``reduce_zero_label`` (mmseg's option, ADE20K's
convention: 0 = "other", not a class) maps 0 -> 255 and k -> k - 1. Without a classes file the
class count is the largest label found in all splits' annotations plus one.

Without a ``validation`` folder, ``val`` is a seeded 10 % of ``training`` (``train90`` the
rest), as for the other formats (:mod:`trimtune.data.factory`).

Every check that can fail is made before training (:meth:`SegDataset.validate`): an image
without its mask (or a mask without its image), an empty split, a mask whose size differs
from its image, a label neither a class nor the ignore index, a malformed classes file. Each
raises one :class:`~trimtune.errors.TrimtuneError` line naming the file and the fix.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import TrimtuneError
from .datasets import to_rgb

IGNORE_INDEX = 255
SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CLASSES_FILE = "classes.txt"

JointTransform = Callable[[Image.Image, Any], tuple[torch.Tensor, Any]]


# ----------------------------------------------------------------------------- files
def read_classes(root: Path) -> list[str] | None:
    """Class names from ``root/classes.txt`` (None when there is none)."""
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline is fine
    names = [ln.strip() for ln in lines]
    fix = "write one class name per line, line i naming label i (background 0 included)"
    if len(names) < 2:
        raise TrimtuneError(f"{path} lists {len(names)} class(es); segmentation needs 2 or more: "
                            f"{fix}")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise TrimtuneError(f"{path} line {blank[0]} is empty, so it does not match the labels: "
                            f"{fix}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise TrimtuneError(f"{path} names {n!r} twice (lines {seen[n] + 1} and {i + 1}), so "
                                f"it does not match the labels: {fix}")
        seen[n] = i
    if len(names) > IGNORE_INDEX:
        raise TrimtuneError(f"{path} lists {len(names)} classes; labels must stay below the "
                            f"ignore index {IGNORE_INDEX}: {fix}")
    return names


def _files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def pair_files(root: Path, split: str) -> list[tuple[str, str]]:
    """``(image, mask)`` paths of one split, sorted by stem."""
    folder = SPLIT_FOLDERS[split]
    img_dir, ann_dir = root / "images" / folder, root / "annotations" / folder
    if not ann_dir.is_dir():
        raise TrimtuneError(f"{img_dir} has no annotation folder {ann_dir}: put each image's "
                            "index-PNG mask there under the image's name (stem.png)")
    images, masks = _files(img_dir), {k: v for k, v in _files(ann_dir).items()
                                      if v.suffix.lower() == ".png"}
    if not images:
        raise TrimtuneError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}): the "
                            f"{split} split is empty; add images or remove the folder")
    lost = sorted(set(images) - set(masks))
    if lost:
        raise TrimtuneError(f"image {images[lost[0]]} has no mask {ann_dir / (lost[0] + '.png')} "
                            f"({len(lost)} image(s) without one): add the masks or remove those "
                            "images")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise TrimtuneError(f"mask {masks[orphans[0]]} has no image of the same name in {img_dir}"
                            f" ({len(orphans)} such mask(s)): add the images or remove the masks")
    return [(str(images[k]), str(masks[k])) for k in sorted(images)]


def load_mask(path: str) -> np.ndarray:
    """An index PNG as a (H, W) uint8 array of labels."""
    try:
        with Image.open(path) as m:
            if m.mode not in ("L", "P", "I;16", "I"):
                raise TrimtuneError(f"mask {path} is a {m.mode} image: save it as an index PNG "
                                    "(mode L or P), one label per pixel")
            a = np.asarray(m)
    except (OSError, SyntaxError, ValueError) as e:
        raise TrimtuneError(f"mask {path} cannot be read ({type(e).__name__}: {e}): replace or "
                            "delete the file") from e
    if a.dtype != np.uint8:
        if a.max(initial=0) > IGNORE_INDEX:
            raise TrimtuneError(f"mask {path} holds label {int(a.max())}: labels must be 0..254 "
                                f"and {IGNORE_INDEX} (ignore); save it as an 8-bit index PNG")
        a = a.astype(np.uint8)
    return a


def reduce_zero(mask: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = mask.astype(np.int16) - 1
    out[mask == 0] = IGNORE_INDEX
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _max_label(root: str, reduce_zero_label: bool, stamp: tuple) -> int:
    """Largest label (ignore index excluded) over every split's masks (cached per folder)."""
    top = -1
    for split in SPLIT_FOLDERS:
        if (Path(root) / "images" / SPLIT_FOLDERS[split]).is_dir():
            for _, mpath in pair_files(Path(root), split):
                m = load_mask(mpath)
                if reduce_zero_label:
                    m = reduce_zero(m)
                v = m[m != IGNORE_INDEX]
                if v.size:
                    top = max(top, int(v.max()))
    return top


def _stamp(root: Path) -> tuple:
    return tuple((SPLIT_FOLDERS[s], (root / "annotations" / SPLIT_FOLDERS[s]).stat().st_mtime_ns)
                 for s in SPLIT_FOLDERS if (root / "annotations" / SPLIT_FOLDERS[s]).is_dir())


# ----------------------------------------------------------------------------- dataset
class SegDataset(torch.utils.data.Dataset):
    """Image / mask pairs read on demand.

    ``dataset[i]`` is ``(image, mask)``: with ``transform`` None a PIL RGB image and a
    ``tv_tensors.Mask`` (H, W) of labels; with a joint transform (:func:`seg_transform`) a
    normalised (3, H, W) float tensor and a (H, W) int64 tensor (255 = ignore).

    Attributes: ``classes``, ``num_classes``, ``root``, ``spec``, ``split``,
    ``reduce_zero_label``, ``ignore_index``; ``targets`` is all zeros (no image-level labels:
    the seeded val hold-out is then a plain random 10 %).
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, samples: Sequence[tuple[str, str]], root: str | Path,
                 classes: Sequence[str] | None, transform: JointTransform | None = None,
                 spec: str = "", split: str = "", reduce_zero_label: bool = False) -> None:
        self.samples = [(str(i), str(m)) for i, m in samples]
        self.root = Path(root)
        self._classes = list(classes) if classes is not None else None
        self.transform = transform
        self.spec, self.split = spec, split
        self.reduce_zero_label = bool(reduce_zero_label)

    # ---- classes -----------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        if self._classes is None:  # inferred once from the labels of every split
            top = _max_label(str(self.root), self.reduce_zero_label, _stamp(self.root))
            self._classes = [str(i) for i in range(max(top + 1, 2))]
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [0] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def with_options(self, *, reduce_zero_label: bool) -> SegDataset:
        """A copy with mmseg's ``reduce_zero_label`` set (classes re-read)."""
        out = copy.copy(self)
        out.reduce_zero_label = bool(reduce_zero_label)
        if read_classes(self.root) is None:
            out._classes = None
        return out

    def with_transform(self, transform: JointTransform | None) -> SegDataset:
        out = copy.copy(self)
        out.transform = transform
        return out

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> SegDataset:
        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in indices]
        out.split = self.split if split is None else split
        return out

    # ---- one item ----------------------------------------------------------------------------
    def load_mask(self, index: int) -> np.ndarray:
        """The ``index``-th mask after ``reduce_zero_label``, checked against the classes."""
        mpath = self.samples[index][1]
        m = load_mask(mpath)
        if self.reduce_zero_label:
            m = reduce_zero(m)
        self._check_labels(m, mpath)
        return m

    def _check_labels(self, m: np.ndarray, mpath: str) -> None:
        bad = (m >= self.num_classes) & (m != IGNORE_INDEX)
        if bad.any():
            y, x = (int(v[0]) for v in np.nonzero(bad))
            where = (f"the {self.num_classes} classes of {self.root / CLASSES_FILE}"
                     if (self.root / CLASSES_FILE).is_file() else f"{self.num_classes} classes")
            raise TrimtuneError(
                f"mask {mpath} has label {int(m[y, x])} at (y={y}, x={x}), not one of {where} "
                f"(0..{self.num_classes - 1}) nor the ignore index {IGNORE_INDEX}: list the class"
                " in classes.txt, set that pixel to 255, or use --reduce-zero-label if 0 is "
                "'other' (ADE20K)")

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                image.load()
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise TrimtuneError(f"image {path} cannot be read ({type(e).__name__}: {e}): replace "
                                "or delete it and its mask") from e

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        image, m = self.load_image(index), self.load_mask(index)
        if m.shape != (image.height, image.width):
            raise _size_error(self.samples[index], m.shape, (image.height, image.width))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(m)))  # a writable copy
        if self.transform is None:
            return image, mask
        x, y = self.transform(image, mask)
        return x, torch.as_tensor(y).as_subclass(torch.Tensor).long()

    # ---- checks before training -------------------------------------------------------------
    def validate(self) -> SegDataset:
        """Read every mask (and image header): sizes and labels checked (see the module doc).
        Returns ``self``."""
        if not self.samples:
            raise TrimtuneError(f"{self.spec or self.root} has no images in split {self.split!r}:"
                                " add images or use another split")
        _ = self.classes
        for ipath, mpath in self.samples:
            with Image.open(ipath) as im:  # the header only
                size = (im.height, im.width)
            m = load_mask(mpath)
            if m.shape != size:
                raise _size_error((ipath, mpath), m.shape, size)
            self._check_labels(reduce_zero(m) if self.reduce_zero_label else m, mpath)
        return self

    def __repr__(self) -> str:
        return (f"SegDataset(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
                f"reduce_zero_label={self.reduce_zero_label})")


def _size_error(pair: tuple[str, str], mshape: tuple, ishape: tuple) -> TrimtuneError:
    return TrimtuneError(f"mask {pair[1]} is {mshape[1]}x{mshape[0]} px but its image {pair[0]} "
                         f"is {ishape[1]}x{ishape[0]}: a mask must have its image's size "
                         "(resize it with nearest-neighbour interpolation)")


def seg_splits(root: str | Path, spec: str = "") -> dict[str, Callable[[], SegDataset]]:
    """Official splits of a ``seg:PATH`` folder, ``{split: loader}`` (nothing read yet)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TrimtuneError(f"dataset folder {root} not found: check the path given as seg:PATH")
    present = [s for s, f in SPLIT_FOLDERS.items() if (root / "images" / f).is_dir()]
    if "train" not in present:
        raise TrimtuneError(f"{root} has no images/training folder: seg:PATH reads the ADE20K "
                            "layout PATH/images/{training,validation} + PATH/annotations/"
                            "{training,validation}")
    classes = read_classes(root)

    def load(split: str) -> SegDataset:
        return SegDataset(pair_files(root, split), root, classes, spec=spec, split=split)

    return {s: partial(load, s) for s in present}


# ----------------------------------------------------------------------------- transforms
def seg_transform(model_or_cfg: Any, train: bool = False, protocol: str = "vtab"):
    """Joint ``(PIL image, tv_tensors.Mask) -> (float image, mask)`` transform at the model's
    input size (torchvision.transforms.v2: the mask is resized by nearest neighbour).

    * ``"vtab"``: resize to (H, W), no augmentation, for training and evaluation alike;
    * ``"fgvc"`` training: RandomResizedCrop(H, W, scale 0.5-1) + horizontal flip, applied
      to image and mask together; evaluation: resize.
    """
    from torchvision.transforms import v2

    from .transforms import PROTOCOLS, data_config

    if protocol not in PROTOCOLS:
        raise TrimtuneError(f"unknown transform protocol {protocol!r}: use one of "
                            f"{', '.join(PROTOCOLS)}")
    cfg = data_config(model_or_cfg)
    size = tuple(int(s) for s in cfg["input_size"][-2:])
    mode = {"bilinear": v2.InterpolationMode.BILINEAR,
            "nearest": v2.InterpolationMode.NEAREST}.get(cfg.get("interpolation"),
                                                         v2.InterpolationMode.BICUBIC)
    ops: list[Any] = [v2.ToImage()]
    if train and protocol == "fgvc":
        ops += [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=mode, antialias=True),
                v2.RandomHorizontalFlip()]
    else:
        ops += [v2.Resize(size, interpolation=mode, antialias=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]
    return v2.Compose(ops)


__all__ = ["CLASSES_FILE", "IGNORE_INDEX", "SPLIT_FOLDERS", "SegDataset", "load_mask",
           "pair_files", "read_classes", "reduce_zero", "seg_splits", "seg_transform"]
