"""Fine-tuning methods: SNELL / SNELLA (kernelised sparse updates) and the usual baselines.

    model = attach(model, SnellaConfig(r=32, target_sparsity=0.7))   # in place
    model = attach(model, "lora", r=8)                                # any method, by name
    ...train with callbacks(model) (SNELLA's allocator, AdaLoRA's)...
    save_adapter(model, "runs/ft"); plain = merge(model)

SNELL / SNELLA are PEFT tuners too (importing this package registers them with PEFT):
``peft.get_peft_model(model, SnellaConfig(...))``, ``PeftModel.from_pretrained``.
"""

from .snell import (DEFAULT_TARGETS, InnerProductKernel, Kernel, MixtureKernel,
                    PiecewiseLinearKernel, RBFKernel, SigmoidKernel, SnellaAllocator,
                    SnellaConfig, SnellaModel, SnellaTrainerCallback, SnellConfig, SnellLinear,
                    SnellModel, SparseDelta, adapter_configs, allocate_budget, config_from_dict,
                    create_kernel, cubic_budget, detach, find_units, format_summary,
                    iter_snell_layers, iter_units, load_adapter, magnitude_threshold, safe_cdist,
                    save_adapter, sparsify, trainable_summary)
from .targets import select_linears, select_modules

from .simple import prepare_method, target_linears, trainable_parameters
from .peft_methods import AdaLoraCallback, adalora_orth_loss
# the one attach and the one merge, for every method (each method registered itself above)
from .registry import REGISTRY, Method, attach, callbacks, merge, method_of  # noqa: E402
from .registry import check_complete as _check_complete  # noqa: E402

_check_complete()

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
