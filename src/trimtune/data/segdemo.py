"""A real offline segmentation set: canvases of real Fashion-MNIST / MNIST / digits items.

No segmentation data set installs offline, so this builds one from real images. Each canvas
(``size`` x ``size`` grey PNG) holds 2-4 (``items``) real images of the source, min-max
normalised, each resized to 28 s px (s uniform in ``scale``, default 1.2-2.0) and pasted at a
random place; an item's foreground pixels (intensity > ``threshold`` x 255 after resizing)
are painted over what lies below and labelled with the item's class + 1; the rest is
background, label 0, drawn as dark noise (mean 16, s.d. 8). Training canvases use the
source's training images only; validation and test canvases use disjoint halves of its test
images, so no item is seen twice.

Written in the ADE20K / mmseg layout that ``seg:PATH`` reads::

    PATH/images/{training,validation,test}/000000.png
    PATH/annotations/{training,validation,test}/000000.png   (index PNG, 0 = background)
    PATH/classes.txt                                           (background + the source classes)
    PATH/segdemo.json                                          (the generator's parameters)

Fixed and seeded: the same arguments write the same bytes. Command line::

    python -m trimtune.data.segdemo PATH [--source fashion-mnist] [--size 112] [--train 400]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import TrimtuneError

VERSION = 1
SOURCES = ("fashion-mnist", "mnist-5k", "digits")
DEFAULTS = dict(source="fashion-mnist", size=112, train=400, val=100, test=100, items=(2, 4),
                scale=(1.2, 2.0), threshold=0.2, seed=0)


def _canvas(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray, size: int,
            items: tuple[int, int], scale: tuple[float, float],
            threshold: float) -> tuple[np.ndarray, np.ndarray]:
    img = np.clip(rng.normal(16.0, 8.0, (size, size)), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(items[0], items[1] + 1))):
        j = int(rng.integers(len(pool)))
        item = pool[j].astype(np.float64)
        lo, hi = item.min(), item.max()
        item = (item - lo) / max(hi - lo, 1e-9) * 255.0
        side = min(max(int(round(28 * rng.uniform(*scale))), 8), size)  # 28 px x scale
        item = np.asarray(Image.fromarray(item.astype(np.uint8)).resize(
            (side, side), Image.BILINEAR), dtype=np.float64)
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        fg = item > threshold * 255.0
        img[y:y + side, x:x + side][fg] = item[fg]
        mask[y:y + side, x:x + side][fg] = int(labels[j]) + 1
    return img.round().astype(np.uint8), mask


def make(path: str | Path, *, source: str = "fashion-mnist", size: int = 112, train: int = 400,
         val: int = 100, test: int = 100, items: tuple[int, int] = (2, 4),
         scale: tuple[float, float] = (1.2, 2.0), threshold: float = 0.2, seed: int = 0,
         overwrite: bool = False) -> Path:
    """Write the demonstration set to ``path`` (see the module docstring) and return it.

    A folder that already holds a set made with the same arguments is returned as it is; any
    other non-empty folder is refused unless ``overwrite``. The set is built beside ``path``
    and renamed into place, so an interrupted build leaves nothing half-written.
    """
    from .builtin import builtin_split

    if source not in SOURCES:
        raise TrimtuneError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    if not (16 <= size <= 1024) or min(train, val, test) < 1:
        raise TrimtuneError(f"size={size}, train={train}, val={val}, test={test}: use a size in "
                            "16..1024 and at least one canvas per split")
    if not (1 <= items[0] <= items[1]) or not (0 < scale[0] <= scale[1]) or \
            not 0 <= threshold < 1:
        raise TrimtuneError(f"items={items}, scale={scale}, threshold={threshold}: give "
                            "1 <= min <= max items, 0 < min <= max scale, 0 <= threshold < 1")
    path = Path(path)
    params = {"version": VERSION, "source": source, "size": size, "train": train, "val": val,
              "test": test, "items": list(items), "scale": list(scale), "threshold": threshold,
              "seed": seed}
    record = path / "segdemo.json"
    if record.is_file():
        try:
            same = json.loads(record.read_text()).get("params") == params
        except (OSError, ValueError):
            same = False
        if same and not overwrite:
            return path
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise TrimtuneError(f"{path} is not empty and holds no set made with these arguments: "
                            "choose an empty folder, or pass overwrite=True (--overwrite)")
    tr, te = builtin_split(source, "train", seed=0), builtin_split(source, "test", seed=0)
    if tr.image_size[0] < 4 or len(te) < 2:
        raise TrimtuneError(f"{source} is too small for a demonstration set")
    rng = np.random.default_rng(seed)
    held = rng.permutation(len(te))
    pools = {"training": (tr.images, np.asarray(tr.targets)),
             "validation": (te.images[held[: len(te) // 2]],
                            np.asarray(te.targets)[held[: len(te) // 2]]),
             "test": (te.images[held[len(te) // 2:]], np.asarray(te.targets)[held[len(te) // 2:]])}
    stage = path.with_name(path.name + ".segdemo-tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for k, (folder, n) in enumerate((("training", train), ("validation", val),
                                         ("test", test))):
            (stage / "images" / folder).mkdir(parents=True)
            (stage / "annotations" / folder).mkdir(parents=True)
            pool, labels = pools[folder]
            split_rng = np.random.default_rng([seed, k])
            for i in range(n):
                img, mask = _canvas(split_rng, pool, labels, size, items, scale, threshold)
                Image.fromarray(img, mode="L").save(stage / "images" / folder / f"{i:06d}.png")
                Image.fromarray(mask, mode="L").save(
                    stage / "annotations" / folder / f"{i:06d}.png")
        (stage / "classes.txt").write_text("\n".join(["background", *tr.classes]) + "\n")
        (stage / "segdemo.json").write_text(json.dumps(
            {"params": params, "generator": "trimtune.data.segdemo.make",
             "doc": "canvases of real items; label = class + 1 on pixels above threshold, "
                    "0 = background"}, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        stage.rename(path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trimtune.data.segdemo",
                                description="write the offline segmentation demonstration set "
                                            "(ADE20K layout; read it with --data seg:PATH)")
    p.add_argument("path")
    p.add_argument("--source", choices=SOURCES, default=DEFAULTS["source"])
    for k in ("size", "train", "val", "test", "seed"):
        p.add_argument(f"--{k}", type=int, default=DEFAULTS[k])
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"])
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        out = make(a.path, source=a.source, size=a.size, train=a.train, val=a.val, test=a.test,
                   threshold=a.threshold, seed=a.seed, overwrite=a.overwrite)
    except TrimtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"segmentation set: {out} (train {a.train}, val {a.val}, test {a.test} canvases of "
          f"{a.size} px; use --task segmentation --data seg:{out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
