"""Calibration statistics for data-aware factorisation (``compress(init="whiten" | "asvd")``).

A few hundred unlabeled images are streamed through the ORIGINAL model; a forward hook on each
linear layer to be factorised accumulates, over every token of every image,

* ``gram``: ``X^T X`` (in x in, float64), the Gram matrix of the layer's inputs (whitening);
* ``abs_sum``: ``sum |x|`` per input channel (float64), for ASVD's activation scale;
* ``rows``: how many input vectors (tokens) were seen.

Batches are folded into these sums as they pass, so only one batch of activations is held at
a time, never the calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import TrimtuneError

__all__ = ["LayerStats", "collect_stats", "calibration_batches"]


@dataclass
class LayerStats:
    """Input statistics of one linear layer (see the module docstring)."""

    in_features: int
    gram: torch.Tensor | None = None
    abs_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    rows: int = 0

    def __post_init__(self) -> None:
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)

    @property
    def second_moment(self) -> torch.Tensor:
        """``X^T X / rows`` (in x in): the Gram matrix per input vector, so that what is built
        from it does not grow with the size of the calibration set."""
        return self.gram / max(self.rows, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel, shape (in,)."""
        return self.abs_sum / max(self.rows, 1)


def _model_img_size(model: nn.Module) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None) if pe is not None else None
    if size is None or getattr(pe, "dynamic_img_size", False):
        return None
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _images_of(batch) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, Mapping):
        x = x.get("pixel_values", x.get("image"))
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise TrimtuneError("calibration data must yield image tensors (B, C, H, W) or "
                            "(images, labels) batches: pass a dataset name, a Dataset or a "
                            "DataLoader of images")
    return x


def calibration_batches(model: nn.Module, data, images: int, batch_size: int = 32,
                        seed: int = 0) -> tuple[Iterable, str]:
    """Batches of at most ``images`` calibration images for ``model``, and a description.

    ``data``: a dataset spec (``"fashion-mnist"``, ``"fashion-mnist@test"``, a folder...; read
    with the model's evaluation transform, split ``train`` unless ``@split`` is given), a
    ``Dataset`` (a seeded subset of ``images`` items: class-stratified when it has ``targets``),
    a ``DataLoader`` / iterable of batches (read until ``images`` images), or an image tensor
    (N, C, H, W).
    """
    if isinstance(data, str):
        from ..data import build_transform, load_dataset, stratified_choice
        name, _, split = data.rpartition("@") if "@" in data else (data, "", "")
        ds = load_dataset(name, split or "train", transform=build_transform(model, train=False),
                          seed=seed)
        n = len(ds)
        if images < n:
            ds = ds.subset(stratified_choice(ds.targets, images, seed))
        return DataLoader(ds, batch_size=batch_size), data
    if isinstance(data, torch.Tensor):
        return list(data[:images].split(batch_size)), f"tensor{tuple(data.shape[1:])}"
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = len(data)
        if images < n:
            targets = getattr(data, "targets", None)
            if targets is not None and len(targets) == n:
                from ..data import stratified_choice
                idx = stratified_choice(list(targets), images, seed)
            else:
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:images]
            data = Subset(data, [int(i) for i in idx])
        return DataLoader(data, batch_size=batch_size), getattr(data, "spec", type(data).__name__)
    if isinstance(data, Iterable):
        return data, type(data).__name__
    raise TrimtuneError(f"calib={type(data).__name__} is not calibration data: pass a dataset "
                        "name (e.g. 'fashion-mnist'), a Dataset, a DataLoader or an image tensor")


@torch.inference_mode()
def collect_stats(model: nn.Module, layers: Mapping[str, nn.Linear], data, *,
                  images: int = 256, batch_size: int = 32, gram: bool = True, seed: int = 0
                  ) -> tuple[dict[str, LayerStats], dict]:
    """Stream up to ``images`` calibration images through ``model`` and accumulate the input
    statistics of each layer in ``layers`` (modules of ``model``).

    Returns:
        ``({layer name: LayerStats}, info)``; ``info`` holds ``calib`` (a description),
        ``images`` (how many were used) and ``tokens`` (input rows per layer, the fewest).
        Raises TrimtuneError for images of another size than the model's, or no images.
    """
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise TrimtuneError(f"calib_images={images!r} must be a positive integer: e.g. 256")
    batches, desc = calibration_batches(model, data, images, batch_size, seed)
    stats = {n: LayerStats(m.in_features,
                           torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                           if gram else None) for n, m in layers.items()}

    def hook(name: str):
        st = stats[name]

        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0].detach().reshape(-1, st.in_features).to("cpu", torch.float64)
            if st.gram is not None:
                st.gram.addmm_(x.mT, x)
            st.abs_sum += x.abs().sum(0)
            st.rows += x.shape[0]
        return fn

    expected = _model_img_size(model)
    p = next(model.parameters())
    was_training = model.training
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    seen = 0
    try:
        model.eval()
        for batch in batches:
            x = _images_of(batch)[: images - seen]
            if expected is not None and tuple(x.shape[-2:]) != expected:
                raise TrimtuneError(
                    f"calibration images are {x.shape[-2]}x{x.shape[-1]} but the model takes "
                    f"{expected[0]}x{expected[1]}: resize them (e.g. with "
                    "trimtune.build_transform(model)) or pass a dataset name")
            try:
                model(x.to(p.device, p.dtype))
            except (RuntimeError, AssertionError) as e:
                raise TrimtuneError(f"the model cannot run on the calibration images "
                                    f"{tuple(x.shape[1:])} ({str(e).splitlines()[0]}): pass "
                                    "images the model takes (e.g. a dataset name)") from e
            seen += len(x)
            if seen >= images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise TrimtuneError("the calibration data holds no image: pass a non-empty dataset")
    tokens = min(st.rows for st in stats.values())
    return stats, {"calib": desc, "images": seen, "tokens": tokens}

