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

# Lazy re-exports (PEP 562): `import trimtune` and `trimtune --help` stay fast; torch, timm
# and PEFT load on the first attribute that needs them.
_EXPORTS = {
    "data": ("build_transform", "list_datasets", "load_dataset"),
    "errors": ("TrimtuneError",),
    "heads": ("SegmentationModel", "segmenter"),
    "lowrank": ("LowRankLinear", "compress", "describe", "is_compressed", "load_compressed",
                "plot_spectra", "save_compressed", "DistillConfig"),
    "measure": ("count_flops", "count_parameters", "evaluate_model", "latency"),
    "models": ("arch_of", "build_from_arch", "create_backbone", "list_zoo"),
    "train": ("TrainConfig", "fit"),
    "tuners": ("SnellaConfig", "SnellConfig", "attach", "detach", "load_adapter",
               "save_adapter", "trainable_summary", "SnellaAllocator", "SnellaTrainerCallback"),
    "tasks": ("FinetuneConfig", "FinetuneResult", "distill", "finetune"),
    "runs": ("load", "load_model", "load_run", "merge", "save", "save_model"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'trimtune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = sorted(_WHERE) + ["__version__"]
