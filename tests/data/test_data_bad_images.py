"""Images that are not plain 8-bit files: a 16-bit PNG keeps its contrast (PIL alone clips it
to white), and an unreadable or truncated file is one error naming that file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trimtune.data import load_dataset
from trimtune.data.datasets import to_rgb
from trimtune.errors import TrimtuneError


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(ramp).save(tmp_path / cls / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").mode.startswith("I")
    image, _ = load_dataset(str(tmp_path))[0]
    a = np.asarray(image)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(a[..., 0], expected) and np.array_equal(a[..., 2], expected)
    assert np.asarray(Image.open(tmp_path / "a" / "x.png").convert("RGB")).mean() > 250  # PIL
    assert 120 < a.mean() < 135  # ours: the ramp's middle grey


@pytest.mark.parametrize("mode,values,expect", [
    ("I", np.array([[0, 300], [65535, 1000]]), np.array([[0, 1], [255, 4]])),
    ("I", np.array([[0, 200], [255, 10]]), np.array([[0, 200], [255, 10]])),  # 8-bit range
    ("F", np.array([[0.0, 0.5], [1.0, 0.25]]), np.array([[0, 128], [255, 64]])),
])
def test_wide_grey_modes(mode, values, expect):
    dtype = np.int32 if mode == "I" else np.float32
    img = Image.fromarray(values.astype(dtype), mode=mode)
    assert np.array_equal(np.asarray(to_rgb(img))[..., 1], expect)


@pytest.mark.parametrize("damage", ["truncated", "not an image", "empty"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / cls / "ok.png")
    bad = tmp_path / "b" / "zz_bad.png"
    good = (tmp_path / "a" / "ok.png").read_bytes()
    bad.write_bytes({"truncated": good[: len(good) // 2], "not an image": b"hello world",
                     "empty": b""}[damage])
    ds = load_dataset(str(tmp_path))
    i = [p for p, _ in ds.samples].index(str(bad))
    ds[0]  # the good ones still load
    with pytest.raises(TrimtuneError, match=r"image .*zz_bad\.png in .* cannot be read .*"
                                            r"replace or delete the file") as e:
        ds[i]
    assert "\n" not in str(e.value)
