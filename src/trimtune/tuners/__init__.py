"""Fine-tuning methods: SNELL / SNELLA (kernelised sparse updates) and the usual baselines.

    model = attach(model, SnellaConfig(rank=32, target_sparsity=0.7))   # in place
    ...train (SnellaAllocator callback for SNELLA)...
    save_adapter(model, "runs/ft"); plain = merge(model)
"""

from .config import DEFAULT_TARGETS, SnellaConfig, SnellConfig, config_from_dict
from .inject import (
    attach,
    detach,
    find_targets,
    format_summary,
    iter_snell_layers,
    iter_units,
    merge,
    trainable_summary,
)
from .io import load_adapter, save_adapter
from .kernels import (
    InnerProductKernel,
    Kernel,
    MixtureKernel,
    PiecewiseLinearKernel,
    RBFKernel,
    SigmoidKernel,
    create_kernel,
    safe_cdist,
)
from .snell import SnellLinear, SparseDelta, magnitude_threshold, sparsify

# written beside this package by another engineer: the SNELLA allocator and the baselines
from .allocator import SnellaAllocator, allocate_budget, cubic_budget, find_units  # noqa: E402
from .baselines import (  # noqa: E402
    METHODS,
    TARGET_SUFFIXES,
    AdaLoraCallback,
    adalora_orth_loss,
    merge_method,
    prepare_method,
    target_linears,
    trainable_parameters,
)

__all__ = [
    "DEFAULT_TARGETS", "SnellConfig", "SnellaConfig", "config_from_dict",
    "attach", "detach", "merge", "find_targets", "iter_snell_layers", "iter_units",
    "trainable_summary", "format_summary", "save_adapter", "load_adapter",
    "Kernel", "PiecewiseLinearKernel", "MixtureKernel", "InnerProductKernel", "RBFKernel",
    "SigmoidKernel", "create_kernel", "safe_cdist",
    "SparseDelta", "SnellLinear", "magnitude_threshold", "sparsify",
    "SnellaAllocator", "allocate_budget", "cubic_budget", "find_units",
    "METHODS", "TARGET_SUFFIXES", "AdaLoraCallback", "adalora_orth_loss", "merge_method",
    "prepare_method", "target_linears", "trainable_parameters",
]
