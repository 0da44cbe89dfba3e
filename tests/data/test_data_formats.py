"""ImageFolder, VTAB-1k list and FGVC JSON formats, read from tiny fixtures in tmp_path."""

import json

import numpy as np
import pytest
from PIL import Image

from trimtune.data import load_dataset, parse_spec
from trimtune.errors import TrimtuneError


def _img(path, value, mode="RGB", size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


@pytest.fixture
def folder(tmp_path):
    """PATH/{train,test}/{cat,dog}/*.png; test lacks 'cat' to check the shared class index."""
    for split, classes in {"train": ("cat", "dog"), "test": ("dog",)}.items():
        for c in classes:
            for i in range(10 if split == "train" else 2):
                _img(tmp_path / split / c / f"{i}.png", 10 * i, mode="L" if c == "dog" else "RGB")
    return tmp_path


def test_imagefolder_splits_share_classes_and_grey_becomes_rgb(folder):
    train = load_dataset(folder)
    test = load_dataset(f"imagefolder:{folder}", "test")
    assert train.classes == test.classes == ["cat", "dog"]
    assert len(train) == 20 and train.targets.count(0) == 10
    assert test.targets == [1, 1]  # 'dog' keeps label 1 although test has no 'cat'
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (6, 5) and label == 1
    val, train90 = load_dataset(folder, "val", seed=1), load_dataset(folder, "train90", seed=1)
    assert len(val) == 2 and sorted(val.targets) == [0, 1] and len(train90) == 18
    assert not {s[0] for s in val.samples} & {s[0] for s in train90.samples}
    with pytest.raises(TrimtuneError, match="test"):
        load_dataset(folder, "holdout")


def test_imagefolder_without_split_folders(tmp_path):
    for c in ("a", "b", "c"):
        _img(tmp_path / c / "x.jpg", 5)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 1, 2]
    with pytest.raises(TrimtuneError, match="no split 'test'"):
        load_dataset(tmp_path, "test")


def test_imagefolder_empty_is_an_error(tmp_path):
    with pytest.raises(TrimtuneError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(TrimtuneError, match="not found"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(TrimtuneError, match="vtab:PATH"):
        load_dataset("vtab:")


@pytest.fixture
def vtab(tmp_path):
    lines = {}
    for split, n in (("train", 10), ("test", 4)):
        for i in range(n):
            rel = f"images/{split}/{i}.jpg"
            _img(tmp_path / rel, 20 * i)
            lines.setdefault(split, []).append(f"{rel} {i % 3}")
    (tmp_path / "train800.txt").write_text("\n".join(lines["train"][:8]) + "\n")
    (tmp_path / "val200.txt").write_text("\n".join(lines["train"][8:]) + "\n")
    (tmp_path / "train800val200.txt").write_text("\n".join(lines["train"]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return tmp_path


def test_vtab_list_splits(vtab):
    sizes = {s: len(load_dataset(f"vtab:{vtab}", s)) for s in
             ("train", "trainval", "train800", "val", "val200", "test")}
    assert sizes == dict(train=10, trainval=10, train800=8, val=2, val200=2, test=4)
    ds = load_dataset(f"vtab:{vtab}", "val")
    assert ds.num_classes == 3 and ds.targets == [8 % 3, 9 % 3]
    image, _ = ds[1]
    assert image.mode == "RGB" and np.asarray(image)[0, 0, 0] == 180
    assert parse_spec(vtab)[0] == "vtab"  # a plain folder with the list files is VTAB


def test_vtab_errors(vtab, tmp_path_factory):
    (vtab / "test.txt").write_text("images/test/0.jpg\n")
    with pytest.raises(TrimtuneError, match="line 1"):
        load_dataset(f"vtab:{vtab}", "test")
    with pytest.raises(TrimtuneError, match="train800.txt"):
        load_dataset(f"vtab:{tmp_path_factory.mktemp('empty')}")


@pytest.mark.parametrize("image_dir", ["images", "Images", "."])
def test_fgvc_json(tmp_path, image_dir):
    annos = {"train": {"001.Albatross/a.jpg": 1, "002.Gull/b.jpg": 2, "002.Gull/c.jpg": 2},
             "val": {"001.Albatross/d.jpg": 1}, "test": {"002.Gull/e.jpg": 2}}
    for split, anno in annos.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(anno))
        for rel in anno:
            _img(tmp_path / image_dir / rel, 7, mode="L")
    train = load_dataset(f"fgvc:{tmp_path}")
    assert train.classes == ["001.Albatross", "002.Gull"] and train.targets == [0, 1, 1]
    assert train[0][0].mode == "RGB"
    assert load_dataset(f"fgvc:{tmp_path}", "test").targets == [1]
    assert len(load_dataset(tmp_path, "trainval")) == 4  # plain folder with train.json is FGVC


def test_fgvc_missing_images_is_an_error(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"x/a.jpg": 0}))
    with pytest.raises(TrimtuneError, match="not found"):
        load_dataset(f"fgvc:{tmp_path}")
