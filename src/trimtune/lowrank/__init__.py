"""PELA low-rank compression: factorised linear layers, rank policies, compress(), describe(),
the compressed-model format on disk and spectrum plots."""

import importlib.util

from .compress import (DEFAULT_SKIP, compress, factorised_layers, get_arch, is_compressed,
                       rank_for, select_layers)
from .describe import Description, LayerInfo, compare, describe
from .io import factorise_like, load_compressed, save_compressed
from .layers import LowRankLinear, truncated_svd
from .plots import plot_spectra

__all__ = ["LowRankLinear", "truncated_svd", "compress", "is_compressed", "factorised_layers",
           "select_layers", "rank_for", "get_arch", "DEFAULT_SKIP", "describe", "compare",
           "Description", "LayerInfo", "save_compressed", "load_compressed", "factorise_like",
           "plot_spectra"]

# --- distillation (written separately, in distill.py): re-exported when present -------------
if importlib.util.find_spec("trimtune.lowrank.distill"):
    from .distill import *  # noqa

    __all__ += list(getattr(importlib.import_module(".distill", __name__), "__all__", []))
