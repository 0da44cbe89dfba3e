"""seg:PATH (ADE20K layout), the joint transform, the demonstration set, and every bad input:
one TrimtuneError line naming the file and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trimtune as tt
from trimtune.data.segmentation import SegDataset, reduce_zero, seg_transform
from trimtune.errors import TrimtuneError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seg_helpers import CLASSES, write_seg  # noqa: E402


@pytest.fixture
def seg(tmp_path) -> Path:
    return write_seg(tmp_path / "seg")


def test_spec_splits_and_items(seg):
    train = tt.load_dataset(f"seg:{seg}", "train")
    assert isinstance(train, SegDataset) and len(train) == 16
    assert train.classes == CLASSES and train.num_classes == 3
    image, mask = train[0]
    assert image.size == (32, 32) and tuple(mask.shape) == (32, 32)
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    assert len(tt.load_dataset(f"seg:{seg}", "val")) == 8
    both = tt.load_dataset(f"seg:{seg}", "trainval")
    assert len(both) == 24
    with pytest.raises(TrimtuneError, match="no split 'test'"):
        tt.load_dataset(f"seg:{seg}", "test")


def test_val_held_out_without_validation_folder(tmp_path):
    root = write_seg(tmp_path / "s", n_train=20, n_val=0)
    val = tt.load_dataset(f"seg:{root}", "val", seed=1)
    rest = tt.load_dataset(f"seg:{root}", "train90", seed=1)
    assert len(val) == 2 and len(rest) == 18
    assert not {s for s, _ in val.samples} & {s for s, _ in rest.samples}


def test_classes_inferred_without_classes_file(tmp_path):
    root = write_seg(tmp_path / "s", classes=None)
    ds = tt.load_dataset(f"seg:{root}")
    assert ds.classes == ["0", "1", "2"]


def test_reduce_zero_label_as_mmseg():
    m = np.array([[0, 1, 2], [255, 3, 0]], np.uint8)
    assert reduce_zero(m).tolist() == [[255, 0, 1], [255, 2, 255]]


def test_joint_transform_keeps_mask_and_image_aligned(tmp_path):
    """Random crops + flips move image and mask together: the bright square (label 1) stays
    under the bright pixels, at every draw; masks are resized by nearest neighbour."""
    root = write_seg(tmp_path / "s", n_train=4, n_val=0)
    tf = seg_transform({"input_size": (3, 48, 48), "mean": (0, 0, 0), "std": (1, 1, 1)},
                       train=True, protocol="fgvc")
    ds = tt.load_dataset(f"seg:{root}").with_transform(tf)
    torch.manual_seed(0)
    for _ in range(10):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.int64
            assert set(y.unique().tolist()) <= {0, 1, 2}  # nearest: no blended labels
            bright = x[0] > 0.75  # the square is 0.9, the disc 0.55, the background < 0.16
            square = y == 1
            if square.sum() > 8:  # overlap up to the resampling blur at the edges; a crop or
                iou = (bright & square).sum() / (bright | square).sum()  # flip of one alone: ~0
                assert iou > 0.6


def test_flip_applies_to_both(tmp_path):
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    img = np.zeros((8, 8), np.uint8)
    img[:, :2] = 255
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :2] = 1
    x, y = v2.RandomHorizontalFlip(p=1.0)(v2.ToImage()(Image.fromarray(img)),
                                          tv_tensors.Mask(torch.from_numpy(mask)))
    assert (x[0, :, -2:] == 255).all() and (y[:, -2:] == 1).all() and (y[:, :2] == 0).all()


# ---------------------------------------------------------------------------- bad input
def _loaded(root: Path, split: str = "train") -> SegDataset:
    return tt.load_dataset(f"seg:{root}", split).validate()


def test_mask_size_differs(seg):
    bad = seg / "annotations" / "training" / "003.png"
    Image.fromarray(np.zeros((30, 32), np.uint8), mode="L").save(bad)
    with pytest.raises(TrimtuneError, match=r"003\.png is 32x30 px but its image .* is 32x32"):
        _loaded(seg)


def test_label_above_class_count(seg):
    bad = seg / "annotations" / "validation" / "002.png"
    m = np.array(Image.open(bad))
    m[5, 7] = 7
    Image.fromarray(m, mode="L").save(bad)
    with pytest.raises(TrimtuneError) as e:
        _loaded(seg, "val")
    msg = str(e.value)
    assert "002.png has label 7 at (y=5, x=7)" in msg and "classes.txt" in msg
    assert "\n" not in msg
    m[5, 7] = 255  # the ignore index is no class, and fine
    Image.fromarray(m, mode="L").save(bad)
    _loaded(seg, "val")


def test_image_without_mask(seg):
    (seg / "annotations" / "training" / "005.png").unlink()
    with pytest.raises(TrimtuneError, match=r"image .*005\.png has no mask .*005\.png"):
        tt.load_dataset(f"seg:{seg}")


def test_mask_without_image(seg):
    (seg / "images" / "training" / "005.png").unlink()
    with pytest.raises(TrimtuneError, match=r"mask .*005\.png has no image"):
        tt.load_dataset(f"seg:{seg}")


def test_empty_split(seg):
    for p in (seg / "images" / "validation").iterdir():
        p.unlink()
    with pytest.raises(TrimtuneError, match=r"validation holds no images .* split is empty"):
        tt.load_dataset(f"seg:{seg}", "val")


def test_classes_file_does_not_match(seg):
    (seg / "classes.txt").write_text("background\nsquare\nsquare\n")
    with pytest.raises(TrimtuneError, match=r"classes\.txt names 'square' twice"):
        tt.load_dataset(f"seg:{seg}")
    (seg / "classes.txt").write_text("background\n\ndisc\n")
    with pytest.raises(TrimtuneError, match=r"classes\.txt line 2 is empty"):
        tt.load_dataset(f"seg:{seg}")
    (seg / "classes.txt").write_text("background\nsquare\n")  # label 2 (disc) is not listed
    with pytest.raises(TrimtuneError, match=r"label 2 .* not one of the 2 classes of .*classes"):
        _loaded(seg)


def test_no_training_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(TrimtuneError, match="no images/training folder"):
        tt.load_dataset(f"seg:{tmp_path / 'x'}")


# ---------------------------------------------------------------------------- demo set
def test_demo_set_is_seeded_and_readable(tmp_path):
    from trimtune.data import segdemo

    a = segdemo.make(tmp_path / "a", source="digits", size=48, train=6, val=3, test=3, seed=3)
    b = segdemo.make(tmp_path / "b", source="digits", size=48, train=6, val=3, test=3, seed=3)
    for split in ("training", "validation", "test"):
        for f in sorted((a / "annotations" / split).iterdir()):
            assert f.read_bytes() == (b / "annotations" / split / f.name).read_bytes()
    ds = tt.load_dataset(f"seg:{a}", "test").validate()
    assert ds.classes[0] == "background" and ds.num_classes == 11
    labels = np.concatenate([np.asarray(ds[i][1]).ravel() for i in range(len(ds))])
    assert (labels == 0).any() and (labels > 0).any()
    assert segdemo.make(a, source="digits", size=48, train=6, val=3, test=3, seed=3) == a
    with pytest.raises(TrimtuneError, match="not empty"):
        segdemo.make(a, source="digits", size=48, train=7, val=3, test=3, seed=3)
