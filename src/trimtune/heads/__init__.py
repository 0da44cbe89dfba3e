"""Task heads on a backbone: decode heads and the segmentation model
(:mod:`trimtune.heads.segmentation`)."""

from .segmentation import (HEADS, IGNORE_INDEX, SEGMENTER, LinearDecodeHead, SegmentationModel,
                           build_segmenter, is_segmenter, segmenter)

__all__ = ["HEADS", "IGNORE_INDEX", "LinearDecodeHead", "SEGMENTER", "SegmentationModel",
           "build_segmenter", "is_segmenter", "segmenter"]
