"""Datasets and transforms: built-in real datasets (no download), ImageFolder, VTAB-1k and FGVC
split formats, synthetic data for tests, and timm-config transforms."""

from .builtin import BUILTIN_INFO, list_datasets
from .datasets import ArrayDataset, FileDataset, LabeledDataset, stratified_choice, stratified_split
from .factory import load_dataset, parse_spec, train_split_beside
from .transforms import build_transform, data_config

__all__ = [
    "ArrayDataset", "BUILTIN_INFO", "FileDataset", "LabeledDataset", "build_transform",
    "data_config", "list_datasets", "load_dataset", "parse_spec", "stratified_choice",
    "stratified_split", "train_split_beside",
]
