"""Top-1 and per-class accuracy of a classifier on a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    top1: float
    per_class: list[float]
    confusion: np.ndarray = field(repr=False)
    num_images: int = 0
    classes: list[str] | None = None

    def to_dict(self) -> dict:
        return {"top1": self.top1, "per_class": self.per_class, "num_images": self.num_images,
                "classes": self.classes, "confusion": self.confusion.tolist()}


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: Dataset, batch_size: int = 128, num_workers: int = 0,
                   device: str | torch.device | None = None, progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on ``data`` (which yields ``(image_tensor, label)``)."""
    device = torch.device(device) if device else next(model.parameters()).device
    num_classes = getattr(data, "num_classes", None) or model.num_classes
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    was_training = model.training
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        pred = model(x.to(device)).argmax(-1).cpu().numpy()
        np.add.at(confusion, (np.asarray(y), pred), 1)
    model.train(was_training)
    n = int(confusion.sum())
    per_class = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
    return EvalResult(top1=float(np.trace(confusion) / max(n, 1)), per_class=per_class,
                      confusion=confusion, num_images=n, classes=getattr(data, "classes", None))
