"""Fine-tuning methods: SNELL / SNELLA (kernelised sparse updates) and the usual baselines.

    model = attach(model, SnellaConfig(r=32, target_sparsity=0.7))   # in place
    model = attach(model, "lora", r=8)                                # any method, by name
    ...train with callbacks(model) (SNELLA's allocator, AdaLoRA's)...
    save_adapter(model, "runs/ft"); plain = merge(model)

SNELL / SNELLA are PEFT tuners too (importing this package registers them with PEFT):
``peft.get_peft_model(model, SnellaConfig(...))``, ``PeftModel.from_pretrained``.
"""

from .config import DEFAULT_TARGETS, SnellaConfig, SnellConfig, config_from_dict
from .inject import (
    adapter_configs,
    detach,
    format_summary,
    iter_snell_layers,
    iter_units,
    trainable_summary,
)
from .snell_tuner import SnellaModel, SnellaTrainerCallback, SnellLinear, SnellModel
from .targets import select_linears, select_modules
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
from .snell import SparseDelta, magnitude_threshold, sparsify

# written beside this package by another engineer: the SNELLA allocator and the baselines
from .allocator import SnellaAllocator, allocate_budget, cubic_budget, find_units  # noqa: E402
from .baselines import (  # noqa: E402
    AdaLoraCallback,
    adalora_orth_loss,
    prepare_method,
    target_linears,
    trainable_parameters,
)
# the one attach and the one merge, for every method
from .registry import REGISTRY, Method, attach, callbacks, merge, method_of  # noqa: E402

__all__ = [
    "DEFAULT_TARGETS", "SnellConfig", "SnellaConfig", "config_from_dict",
    "attach", "detach", "merge", "adapter_configs", "iter_snell_layers", "iter_units",
    "select_linears", "select_modules", "SnellModel", "SnellaModel", "SnellaTrainerCallback",
    "trainable_summary", "format_summary", "save_adapter", "load_adapter",
    "Kernel", "PiecewiseLinearKernel", "MixtureKernel", "InnerProductKernel", "RBFKernel",
    "SigmoidKernel", "create_kernel", "safe_cdist",
    "SparseDelta", "SnellLinear", "magnitude_threshold", "sparsify",
    "SnellaAllocator", "allocate_budget", "cubic_budget", "find_units",
    "REGISTRY", "Method", "method_of", "callbacks", "AdaLoraCallback", "adalora_orth_loss",
    "prepare_method", "target_linears", "trainable_parameters",
]
