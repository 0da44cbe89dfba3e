"""SNELL / SNELLA: kernelised sparse weight updates, one folder shaped like a PEFT tuner package.

- :mod:`.config`: ``SnellConfig`` / ``SnellaConfig``;
- :mod:`.kernels`: the kernels ``k(A, B)``; :mod:`.sparsifier`: the competition by magnitude;
- :mod:`.delta`: ``SparseDelta``, one unit; :mod:`.autograd`: its three backward paths
  (closed form, ``torch.compile``-fused via :mod:`.compiled`, autograd);
- :mod:`.layer` / :mod:`.model` / :mod:`.peft_types`: the PEFT layer, tuner and registration;
- :mod:`.attach`: attach in place (the registry's SNELL / SNELLA entries); :mod:`.io`: the
  adapter folder; :mod:`.allocator`: SNELLA's budget; :mod:`.callback`: the HF Trainer callback.
"""

from .allocator import SnellaAllocator, allocate_budget, cubic_budget, find_units
from .attach import (
    adapter_configs,
    detach,
    format_summary,
    iter_snell_layers,
    iter_units,
    trainable_summary,
)
from .callback import SnellaTrainerCallback
from .config import DEFAULT_TARGETS, SnellaConfig, SnellConfig, config_from_dict
from .delta import SparseDelta
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
from .layer import SnellLinear
from .model import SnellaModel, SnellModel
from .sparsifier import magnitude_threshold, sparsify

__all__ = [
    "DEFAULT_TARGETS", "SnellConfig", "SnellaConfig", "config_from_dict", "SparseDelta",
    "SnellLinear", "SnellModel", "SnellaModel", "SnellaTrainerCallback", "SnellaAllocator",
    "allocate_budget", "cubic_budget", "find_units", "adapter_configs", "detach",
    "format_summary", "iter_snell_layers", "iter_units", "trainable_summary", "load_adapter",
    "save_adapter", "InnerProductKernel", "Kernel", "MixtureKernel", "PiecewiseLinearKernel",
    "RBFKernel", "SigmoidKernel", "create_kernel", "safe_cdist", "magnitude_threshold",
    "sparsify",
]
