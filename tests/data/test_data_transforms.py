"""build_transform: the model's input size and normalisation, per protocol."""

import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config

from trimtune.data import build_transform, data_config, load_dataset
from trimtune.errors import TrimtuneError


def _mean_image(cfg, size=(20, 12)):
    return Image.new("RGB", size, tuple(round(255 * m) for m in cfg["mean"]))


@pytest.mark.parametrize("protocol,train", [("vtab", False), ("vtab", True),
                                            ("fgvc", False), ("fgvc", True)])
def test_model_size_and_normalisation(vit, protocol, train):
    vit.pretrained_cfg = {**vit.pretrained_cfg, "mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3)}
    cfg = resolve_data_config(model=vit)
    assert cfg["mean"] == (0.2, 0.4, 0.6)
    tf = build_transform(vit, train=train, protocol=protocol)
    x = tf(_mean_image(cfg))
    assert x.shape == (3, 32, 32)  # the size the ViT was built for (img_size=32), not 224
    assert x.abs().max() < 0.05  # the model's mean colour normalises to ~0
    white = tf(Image.new("RGB", (9, 9), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], torch.tensor([8.0, 3.0, 4 / 3]), atol=1e-3)


def test_data_config_for_model_built_at_another_size(vit):
    assert data_config(vit)["input_size"] == (3, 32, 32)
    assert data_config(64)["input_size"] == (3, 64, 64)


def test_vtab_is_deterministic_and_uses_whole_image():
    cfg = {"input_size": (3, 16, 24), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 1, 8))  # a white column on the left border survives
    a, b = build_transform(cfg, train=True)(image), build_transform(cfg, train=True)(image)
    assert a.shape == (3, 16, 24) and torch.equal(a, b)
    assert a[:, :, 0].mean() > 0.5 and a.min() >= -1.0 - 1e-6


def test_fgvc_train_augments_eval_is_deterministic():
    cfg = {"img_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())
    torch.manual_seed(0)
    train = [build_transform(cfg, train=True, protocol="fgvc")(image) for _ in range(3)]
    assert not torch.equal(train[0], train[1]) or not torch.equal(train[1], train[2])
    ev = build_transform(cfg, protocol="fgvc")
    assert torch.equal(ev(image), ev(image)) and ev(image).shape == (3, 16, 16)


def test_dataset_with_transform_batches(vit):
    ds = load_dataset("synthetic:n=8", transform=build_transform(vit))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    assert torch.isfinite(vit(x)).all()


def test_bad_inputs():
    with pytest.raises(TrimtuneError, match="vtab, fgvc"):
        build_transform({"img_size": 32}, protocol="imagenet")
    with pytest.raises(TrimtuneError, match="model"):
        build_transform("vit_tiny")
