"""Segmentation metrics: one confusion matrix (``torch.bincount``), mIoU and pixel accuracy,
as mmsegmentation computes them; and a picture of predicted masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels whose target is
    ``ignore_index`` are left out. ``pred`` and ``target``: integer tensors of one shape."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def scores(confusion: torch.Tensor | np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU / accuracy from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class absent from both the ground truth and the predictions
    has no IoU (None) and is left out of the mean (mmseg's ``nanmean``)."""
    c = torch.as_tensor(confusion, dtype=torch.float64)
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    gt = c.sum(1)
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    total = c.sum()
    return {"miou": float(iou[valid].mean()) if valid.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": [None if torch.isnan(v) else float(v) for v in iou],
            "per_class_acc": [None if torch.isnan(v) else float(v) for v in acc]}


@dataclass
class SegEvalResult:
    miou: float
    pixel_acc: float
    per_class_iou: list[float | None]
    confusion: np.ndarray = field(repr=False)
    num_images: int = 0
    classes: list[str] | None = None

    def to_dict(self) -> dict:
        return {"miou": self.miou, "pixel_acc": self.pixel_acc,
                "per_class_iou": self.per_class_iou, "num_images": self.num_images,
                "classes": self.classes, "confusion": self.confusion.tolist()}


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, data: Dataset, batch_size: int = 32,
                          num_workers: int = 0, device: str | torch.device | None = None,
                          progress: bool = True) -> SegEvalResult:
    """mIoU and pixel accuracy of ``model`` ((B, 3, H, W) -> (B, K, H, W) logits) on ``data``
    (which yields ``(image, mask)`` tensors, 255 = ignore), from one confusion matrix."""
    device = torch.device(device) if device else next(model.parameters()).device
    k = int(getattr(data, "num_classes", None) or model.num_classes)
    ignore = int(getattr(data, "ignore_index", IGNORE_INDEX))
    conf = torch.zeros(k, k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    n = 0
    for x, y in tqdm(DataLoader(data, batch_size=batch_size, num_workers=num_workers),
                     desc="evaluate", disable=not progress, leave=False):
        pred = model(x.to(device)).argmax(1).cpu()
        conf += confusion_matrix(pred, y, k, ignore)
        n += len(x)
    model.train(was_training)
    s = scores(conf)
    return SegEvalResult(miou=s["miou"], pixel_acc=s["pixel_acc"],
                         per_class_iou=s["per_class_iou"], confusion=conf.numpy(), num_images=n,
                         classes=getattr(data, "classes", None))


def palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) uint8 colours: class k, and black last for the ignore index."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    cols = [(0, 0, 0)] + [tuple(int(255 * v) for v in cmap(i % 20)[:3])
                          for i in range(num_classes - 1)]
    return np.array(cols + [(255, 255, 255)], dtype=np.uint8)


def colorize(mask: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) colours (class 0 black, ignored pixels white)."""
    pal = palette(num_classes)
    m = np.where(mask == ignore_index, num_classes, np.clip(mask, 0, num_classes - 1))
    return pal[m]


def plot_masks(images: list[np.ndarray], truth: list[np.ndarray],
               predictions: dict[str, list[np.ndarray]], num_classes: int,
               path: str | Path, title: str | None = None,
               classes: list[str] | None = None) -> Path:
    """A grid: one row per image (image, ground truth, then each model's predicted mask)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..checkpoint import atomic_path

    cols = 2 + len(predictions)
    rows = len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.6), squeeze=False)
    for r in range(rows):
        panels = [("image", images[r]), ("ground truth", colorize(truth[r], num_classes))]
        panels += [(name, colorize(p[r], num_classes)) for name, p in predictions.items()]
        for c, (name, img) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    if classes:
        pal = palette(num_classes) / 255.0
        fig.legend(handles=[Patch(color=pal[i], label=n) for i, n in enumerate(classes)],
                   loc="lower center", ncol=min(6, len(classes)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if classes else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


__all__ = ["SegEvalResult", "colorize", "confusion_matrix", "evaluate_segmentation", "palette",
           "plot_masks", "scores"]
