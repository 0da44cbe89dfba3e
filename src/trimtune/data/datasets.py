"""Dataset containers shared by every data source, and the seeded stratified split helpers.

Two containers cover everything trimtune reads:

* :class:`ArrayDataset` keeps images as one ``uint8`` numpy array (N, H, W) or (N, H, W, 3) and
  builds the PIL image lazily in ``__getitem__`` (built-in datasets, synthetic data).
* :class:`FileDataset` keeps a list of ``(path, label)`` pairs and opens the file lazily
  (ImageFolder, VTAB-1k list files, FGVC JSON annotations).

Both yield ``(image, label)``: a PIL RGB image when ``transform`` is None, else
``transform(image)``; both carry ``.num_classes``, ``.classes``, ``.targets``, ``.spec`` and
``.split``, and can be sub-set by index (:meth:`subset`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import TrimtuneError

Transform = Callable[[Image.Image], Any]


class LabeledDataset(Dataset):
    """Base class: labels, class names and an optional transform; subclasses load one image."""

    def __init__(self, targets: Sequence[int], classes: Sequence[str], transform: Transform | None,
                 spec: str = "", split: str = ""):
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.transform = transform
        self.spec = spec
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        """The ``index``-th image as a PIL RGB image (no transform)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def subset(self, indices: Sequence[int] | np.ndarray,
               split: str | None = None) -> LabeledDataset:
        """A new dataset of the same kind holding only ``indices`` (same classes, transform)."""
        raise NotImplementedError

    def with_transform(self, transform: Transform | None) -> LabeledDataset:
        """A shallow copy that applies ``transform`` (the data itself is shared, not copied)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes})")


class ArrayDataset(LabeledDataset):
    """Images held in memory as ``uint8`` numpy arrays.

    Args:
        images: (N, H, W) grey or (N, H, W, 3) RGB ``uint8`` array; grey becomes 3-channel RGB.
        targets: (N,) integer labels in ``[0, len(classes))``.
        classes: class names.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 transform: Transform | None = None, spec: str = "", split: str = ""):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise TypeError(f"images must be uint8 (N, H, W[, 3]), got {images.dtype} "
                            f"{images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        super().__init__(targets, classes, transform, spec, split)
        self.images = images

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], np.asarray(self.targets)[idx], self.classes,
                            self.transform, self.spec, self.split if split is None else split)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB. 16-bit (``I;16*``) and 32-bit integer (``I``) grey images are
    scaled from their 16-bit range (PIL's own ``convert`` clips them to 255: almost all white);
    float (``F``) images from [0, 1] when they fit, else from their own min..max."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            lo, hi = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (
                float(a.min(initial=0)), float(a.max(initial=1)))
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        elif image.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _default_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now, inside the open file: a truncated file fails here
        return to_rgb(image)


class FileDataset(LabeledDataset):
    """Images read from files on demand.

    Args:
        samples: ``(path, label)`` pairs.
        classes: class names, indexed by label.
        loader: opens a path as a PIL image (default: PIL, converted to RGB).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Transform | None = None, spec: str = "", split: str = "",
                 loader: Callable[[str], Image.Image] = _default_loader):
        super().__init__([label for _, label in samples], classes, transform, spec, split)
        self.samples = [(str(p), int(label)) for p, label in samples]
        self.loader = loader

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            return to_rgb(self.loader(path))
        except FileNotFoundError as e:
            raise TrimtuneError(f"image {path} listed in {self.spec!r} ({self.split}) is missing: "
                                "restore the file or remove it from the list") from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated, broken
            why = ("not an image file PIL can read" if isinstance(e, UnidentifiedImageError)
                   else f"{type(e).__name__}: {e}")
            raise TrimtuneError(f"image {path} in {self.spec!r} ({self.split}) cannot be read "
                                f"({why}): replace or delete the file") from e

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> FileDataset:
        return FileDataset([self.samples[int(i)] for i in indices], self.classes, self.transform,
                           self.spec, self.split if split is None else split, self.loader)


def stratified_choice(targets: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Pick ``n`` indices, class-stratified and seeded (sorted ascending).

    Per-class counts are proportional to the class frequencies (exactly ``n / C`` per class for
    a balanced set whose size allows it), as ``sklearn.model_selection.train_test_split(...,
    stratify=targets)`` does. Falls back to a plain seeded draw when stratification is
    impossible (a class with a single image, or ``n`` smaller than the number of classes).
    """
    from sklearn.model_selection import train_test_split

    total = len(targets)
    if not 0 < n <= total:
        raise ValueError(f"cannot choose {n} of {total} images")
    if n == total:
        return np.arange(total)
    idx = np.arange(total)
    try:
        chosen, _ = train_test_split(idx, train_size=n, stratify=np.asarray(targets),
                                     random_state=seed)
    except ValueError:  # too few images per class to stratify
        chosen = np.random.default_rng(seed).choice(total, size=n, replace=False)
    return np.sort(chosen)


def stratified_split(targets: Sequence[int], holdout: float | int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(targets))`` into (kept, held-out) indices, stratified and seeded.

    ``holdout`` is a fraction in (0, 1) or a count. Both index arrays are sorted; together they
    are a partition of all indices.
    """
    total = len(targets)
    n_out = int(round(holdout * total)) if isinstance(holdout, float) else int(holdout)
    n_out = min(max(n_out, 1), total - 1) if total > 1 else 0
    if n_out == 0:
        return np.arange(total), np.arange(0)
    held = stratified_choice(targets, n_out, seed)
    kept = np.setdiff1d(np.arange(total), held)
    return kept, held
