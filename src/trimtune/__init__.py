"""trimtune: compress (PELA) and sparsely fine-tune (SNELL / SNELLA) pre-trained vision
Transformers, and join the two.

    import trimtune as tt
    teacher = tt.create_backbone("dinov2_small.imgfocus", num_classes=10, img_size=112)
    student = tt.compress(teacher, ratio=2.0)
    tt.distill(student, teacher, "fashion-mnist", tt.DistillConfig())
    run = tt.finetune(student, "fashion-mnist:1k", tt.FinetuneConfig(method="snella"))
    plain = tt.merge(run.model)

This module only re-exports; nothing inside the package imports from here.
"""

__version__ = "0.1.0"

from .data import build_transform, list_datasets, load_dataset  # noqa: E402
from .errors import TrimtuneError  # noqa: E402
from .lowrank import (  # noqa: E402
    LowRankLinear,
    compress,
    describe,
    is_compressed,
    load_compressed,
    plot_spectra,
    save_compressed,
)
from .measure import count_flops, count_parameters, evaluate_model, latency  # noqa: E402
from .models import arch_of, build_from_arch, create_backbone, list_zoo  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402
from .tuners import (  # noqa: E402
    SnellaConfig,
    SnellConfig,
    attach,
    detach,
    load_adapter,
    save_adapter,
    trainable_summary,
)

from .pipeline import (  # noqa: E402, I001
    FinetuneConfig,
    FinetuneResult,
    distill,
    finetune,
    load_model,
    merge,
    save_model,
)
from .lowrank import DistillConfig  # noqa: E402
from .tuners import SnellaAllocator, merge as merge_adapter  # noqa: E402

__all__ = [
    "DistillConfig", "FinetuneConfig", "FinetuneResult", "LowRankLinear", "SnellConfig",
    "SnellaAllocator", "SnellaConfig", "TrainConfig", "TrimtuneError", "arch_of", "attach",
    "build_from_arch", "build_transform", "compress", "count_flops", "count_parameters",
    "create_backbone", "describe", "detach", "distill", "evaluate_model", "finetune", "fit",
    "is_compressed", "latency", "list_datasets", "list_zoo", "load_adapter", "load_compressed",
    "load_dataset", "load_model", "merge", "merge_adapter", "plot_spectra", "save_adapter",
    "save_compressed", "save_model", "trainable_summary", "__version__",
]
