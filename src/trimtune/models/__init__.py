"""Backbones: timm names, local weight files and the offline zoo (``trimtune.models``)."""

from .factory import (arch_of, build_from_arch, create_backbone, is_transformers_model,
                      load_weights, set_drop_path_rate)
from .imgfocus import convert_imgfocus_onnx, imgfocus_onnx_path
from .zoo import ZOO, ZooEntry, cache_dir, cached_weights, list_zoo

__all__ = [
    "ZOO",
    "ZooEntry",
    "arch_of",
    "build_from_arch",
    "cache_dir",
    "cached_weights",
    "convert_imgfocus_onnx",
    "create_backbone",
    "imgfocus_onnx_path",
    "is_transformers_model",
    "list_zoo",
    "load_weights",
    "set_drop_path_rate",
]
