"""Datasets and transforms: built-in real datasets (no download), ImageFolder, VTAB-1k and FGVC
split formats, synthetic data for tests, and timm-config transforms."""

from .builtin import BUILTIN_INFO, list_datasets
from .datasets import ArrayDataset, FileDataset, LabeledDataset, stratified_choice, stratified_split
from .factory import (as_dataset, check_classes, describe_data, disjoint_train, load_dataset,
                      parse_spec, split_spec, train_split_beside)
from .transforms import build_transform, data_config

__all__ = [
    "ArrayDataset", "BUILTIN_INFO", "FileDataset", "LabeledDataset", "as_dataset",
    "build_transform", "check_classes", "describe_data", "disjoint_train", "split_spec",
    "data_config", "list_datasets", "load_dataset", "parse_spec", "stratified_choice",
    "stratified_split", "train_split_beside",
]
