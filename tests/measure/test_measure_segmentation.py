"""mIoU and pixel accuracy from one confusion matrix, against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import torch

from trimtune.measure.segmentation import (colorize, confusion_matrix, evaluate_segmentation,
                                           scores)


def test_confusion_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 4)
    # rows = truth, cols = prediction; the 255 pixel is left out; class 3 appears nowhere
    want = torch.tensor([[1, 1, 0, 0],
                         [0, 2, 1, 0],
                         [1, 0, 1, 0],
                         [0, 0, 0, 0]])
    assert torch.equal(conf, want)
    s = scores(conf)
    # IoU = TP / (TP + FP + FN): class 0: 1/(1+1+1) = 1/3; class 1: 2/(2+1+1) = 1/2;
    # class 2: 1/(1+1+1) = 1/3; class 3: no union, left out of the mean
    assert s["per_class_iou"][:3] == [1 / 3, 1 / 2, 1 / 3] and s["per_class_iou"][3] is None
    assert math.isclose(s["miou"], (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert math.isclose(s["pixel_acc"], 4 / 7)
    assert s["per_class_acc"][:3] == [1 / 2, 2 / 3, 1 / 2]


def test_perfect_and_empty():
    y = torch.randint(0, 3, (2, 5, 5))
    assert scores(confusion_matrix(y, y, 3))["miou"] == 1.0
    empty = scores(torch.zeros(3, 3, dtype=torch.int64))
    assert empty["miou"] == 0.0 and empty["pixel_acc"] == 0.0


class _Oracle(torch.nn.Module):
    """Predicts the mask hidden in the image's first channel."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), 3).permute(0, 3, 1, 2).float()


def test_evaluate_over_batches_equals_one_matrix():
    g = torch.Generator().manual_seed(0)
    ys = torch.randint(0, 3, (7, 6, 6), generator=g)
    preds = ys.clone()
    preds[:, 0] = (preds[:, 0] + 1) % 3  # one wrong row per image
    ys[0, 1, 1] = 255
    data = [(p.float().expand(3, -1, -1).clone(), y) for p, y in zip(preds, ys)]
    r = evaluate_segmentation(_Oracle(), data, batch_size=3, progress=False)
    want = scores(confusion_matrix(preds, ys, 3))
    assert r.miou == want["miou"] and r.pixel_acc == want["pixel_acc"]
    assert r.num_images == 7 and r.confusion.sum() == 7 * 36 - 1


def test_colorize_background_black_ignore_white():
    c = colorize(np.array([[0, 1], [255, 2]]), 3)
    assert c[0, 0].tolist() == [0, 0, 0] and c[1, 0].tolist() == [255, 255, 255]
