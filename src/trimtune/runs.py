"""Run folders and model files: load a model from any source, save an adapter, load a
fine-tuning run back, merge, save a plain model.

- a model folder (``trimtune compress / distill / merge``): ``model.safetensors`` +
  ``trimtune.json`` (:func:`save_model`);
- a fine-tuning run folder: ``run.json`` (config, base, data), ``adapter/`` (:func:`save`),
  ``results.json``, ``metrics.jsonl`` and plots; :func:`load_run` rebuilds base + adapter.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import __version__
from .checkpoint import file_sha256, read_json, read_safetensors, write_json, write_safetensors
from .errors import TrimtuneError
from .finetune_config import FinetuneConfig, prepare
from .lowrank import is_compressed, load_compressed, save_compressed
from .lowrank.io import factorise_like, weights_file
from .models import arch_of, build_from_arch, create_backbone
from .train import trainable_state
from .tuners import SnellConfig, adapter_configs, load_adapter, registry, save_adapter
from .tuners.peft_methods import load_peft_tensors, lora_config, save_peft_adapter
from .tuners.snell.io import base_arch

ADAPTER = "adapter"
#: trimtune's record of a LoRA / DoRA / AdaLoRA adapter (method, options, base), beside PEFT's
#: own ``adapter_config.json`` (PEFT warns of keys it does not know there)
RECORD = "trimtune_adapter.json"


def input_size(model: nn.Module) -> int | None:
    """The input resolution of a ViT-like model (``patch_embed.img_size``), else None."""
    pe = getattr(model, "patch_embed", None)
    return pe.img_size[0] if pe is not None and getattr(pe, "img_size", None) else None


def load_model(spec: str | nn.Module, *, num_classes: int | None = None,
               img_size: int | None = None, weights: str | None = None,
               seed: int | None = None) -> nn.Module:
    """A model from a timm / zoo name, a compressed-model or merged-model folder, or a
    fine-tuning run folder (base + adapter). ``num_classes`` replaces the head when it differs;
    ``seed`` seeds torch first, so that new head is the same on every run (``None``: seed 0,
    drawn in a forked RNG that leaves the global one as it was)."""
    import torch

    if img_size is not None and img_size < 1:
        raise TrimtuneError(f"img_size={img_size}: give a positive resolution that is a "
                            "multiple of the patch size, e.g. 224")
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(spec, nn.Module):
        model = spec
    else:
        path = Path(spec)
        if path.is_dir() and (path / "run.json").is_file():
            model = load_run(path)
        elif path.is_dir() and (path / "trimtune.json").is_file():
            model = load_compressed(path)
        elif path.is_dir():
            raise TrimtuneError(
                f"{path} is a folder but holds neither trimtune.json (a model written by "
                "`trimtune compress/distill/merge`) nor run.json (a `trimtune finetune` run)")
        else:
            model = create_backbone(str(spec), weights=weights, num_classes=num_classes,
                                    img_size=img_size, seed=0 if seed is None else seed)
        have = input_size(model)
        if path.is_dir() and img_size is not None and have is not None and have != img_size:
            raise TrimtuneError(f"{path} holds a model for {have} px images, not img_size="
                                f"{img_size}: drop img_size, or start again from the backbone "
                                "name with the new size")
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        with torch.random.fork_rng(devices=[], enabled=seed is None):
            if seed is None:
                torch.manual_seed(0)
            model.reset_classifier(num_classes)
        arch = getattr(model, "trimtune_arch", None)
        if arch is not None:
            arch["kwargs"]["num_classes"] = num_classes
    return model


def base_spec(model: nn.Module) -> dict:
    """How to rebuild the base: its architecture record (and compression ranks)."""
    if is_compressed(model):
        return {"arch": arch_of(model), "compressed": model.trimtune_lowrank}
    return {"arch": arch_of(model)}


def identity(model: nn.Module) -> dict:
    """What a resume compares about a model: its architecture record, or its class and size."""
    try:
        return base_spec(model)
    except TrimtuneError:
        return {"class": type(model).__name__,
                "num_params": sum(p.numel() for p in model.parameters())}


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): an in-memory base's id."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _base_files(spec: dict) -> list[Path]:
    """The files a base named in run.json is read from (a model folder's weights, --weights)."""
    files = []
    folder = Path(spec["model"]) if spec.get("model") else None
    if folder is not None:  # model.safetensors (a transformers model: trimtune_model...)
        weights = (weights_file(folder) if (folder / "trimtune.json").is_file()
                   else folder / "model.safetensors")
        if weights.is_file():
            files.append(weights)
    if spec.get("weights") and Path(spec["weights"]).is_file():
        files.append(Path(spec["weights"]))
    return files


def with_identity(spec: dict | None) -> dict | None:
    """``spec`` (a base named in run.json) plus the SHA-256 of the files the base is read from:
    a base replaced after fine-tuning is then refused when the run is loaded (and on resume)."""
    if spec is None:
        return None
    spec = dict(spec)
    files = _base_files(spec)
    if files:
        spec["sha256"] = {str(f): file_sha256(f) for f in files}
    return spec


def run_base_spec(model: nn.Module, spec: dict | None, out: Path | None, *, attached: bool,
                  resume: bool) -> dict | None:
    """The base a run folder names in run.json: ``spec`` with its files' hashes, or, for an
    in-memory base that cannot be rebuilt from a name (compressed + distilled, a user's own
    model), its weights kept in ``out/base`` (not rewritten on resume) and their hash, so
    ``load_model(run_dir)`` gives back the tuned model and a changed base is refused."""
    spec = with_identity(spec)
    if out and spec is None:
        base = registry.base_copy(model) if attached else model
        if not (resume and (out / "base").is_dir()):
            save_model(base, out / "base")
        spec = {"model": "base", "weights_sha256": state_sha256(base)}
    return spec


def check_identity(spec: dict, run_dir: Path) -> None:
    """Refuse a base whose files are gone or changed since ``run_dir`` was trained on it."""
    for f, digest in (spec.get("sha256") or {}).items():
        if not Path(f).is_file():
            raise TrimtuneError(f"the base of {run_dir} is gone: {f} not found; restore it "
                                "(run.json names it)")
        now = file_sha256(f)
        if now != digest:
            raise TrimtuneError(f"the base {f} changed since {run_dir} was trained (sha256 "
                                f"{digest[:12]} -> {now[:12]}): restore the original base, or "
                                "fine-tune again on the new one")


def save(model: nn.Module, out_dir: str | Path, *, method: str | None = None) -> Path:
    """Adapter-only save, for any method (the one save). SNELL / SNELLA: a PEFT adapter folder
    (:func:`trimtune.tuners.save_adapter`); LoRA / DoRA / AdaLoRA: a PEFT adapter folder too
    (:func:`~trimtune.tuners.peft_methods.save_peft_adapter`, the head as ``modules_to_save``)
    plus trimtune's record in ``trimtune_adapter.json``; other methods: their trained tensors
    (biases, head...) and the record in the same two files, enough to rebuild them on the base
    in run.json."""
    out_dir = Path(out_dir)
    if any(isinstance(c, SnellConfig) for c in adapter_configs(model).values()):
        return save_adapter(model, out_dir)
    metadata = {"format": "pt", "trimtune_version": __version__}
    if lora_config(model) is not None:
        state = save_peft_adapter(model, out_dir, metadata)
        record_file = RECORD
    else:
        state = trainable_state(model)
        write_safetensors(out_dir / "adapter_model.safetensors", state, metadata=metadata)
        record_file = "adapter_config.json"
    record = dict(getattr(model, "trimtune_method", None) or {})
    write_json(out_dir / record_file, {
        **record, "method": method or registry.method_of(model),
        "base": {"arch": base_arch(model), "num_params": _base_numel(model)},
        "num_tensors": len(state),
        "num_parameters": int(sum(v.numel() for v in state.values())),
        "trimtune_version": __version__})
    return out_dir


def _base_numel(model: nn.Module) -> int:
    """Parameter entries of the base under a baseline method: a PEFT layer contributes only its
    ``base_layer`` (masked-sparse, full, linear and bitfit add no parameters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return sum(p.numel() for n, p in model.named_parameters()
               if not any(n.startswith(t) and not n.startswith(t + "base_layer.") for t in layers))


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """The inverse of :func:`save`, for any method: attach the saved method to ``model`` (in
    place) and load its tensors. SNELL / SNELLA (PEFT adapters): :func:`load_adapter`.

    Raises:
        TrimtuneError: a folder of another tool or method, or tensors that do not fit.
    """
    path = Path(path)
    meta = read_json(path / "adapter_config.json")
    peft_saved = bool(meta.get("peft_type")) and (path / RECORD).is_file()
    if meta.get("peft_type") and not peft_saved:
        return load_adapter(model, path)
    if peft_saved:  # LoRA / DoRA / AdaLoRA saved by PEFT's rules; the record beside it
        meta = read_json(path / RECORD)
    method = meta.get("method")
    if method not in registry.REGISTRY:
        where = path / (RECORD if peft_saved else "adapter_config.json")
        raise TrimtuneError(f"{where} names method {method!r}, not one of "
                            f"{', '.join(registry.REGISTRY)}: load it with the tool that wrote it")
    state = {} if peft_saved else read_safetensors(path / "adapter_model.safetensors")
    base = meta.get("base") or {}
    want, have = base.get("arch"), base_arch(model)
    if want and have and want != have:
        raise TrimtuneError(f"adapter {path} was trained on a {want} base, this model is a "
                            f"{have}: load it onto a {want} model")
    n = _base_numel(model)
    if base.get("num_params") not in (None, n):
        raise TrimtuneError(f"adapter {path} belongs to a base with {base['num_params']:,} "
                            f"parameters, this model has {n:,}: load it onto the base it was "
                            "trained on (architecture, num_classes, compression)")
    if "rank" in meta and "r" not in meta:  # written before the rank was r (trimtune 0.1)
        meta["r"] = meta.pop("rank")
    options = {k: meta[k] for k in registry.get(method).rebuild_options
               if meta.get(k) is not None}
    try:
        registry.attach(model, method, **options)
        if peft_saved:
            return load_peft_tensors(model, path)
        _, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TrimtuneError) as e:  # torch: size mismatch; no such target layer
        if str(e).startswith(f"adapter {path} "):  # load_peft_tensors said it all
            raise
        why = str(e).split("size mismatch for ", 1)[-1].split("\n")[0][:160]
        raise TrimtuneError(f"adapter {path} does not fit this model ({why}): load it onto "
                            "the base it was trained on") from e
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if unexpected or missing:
        raise TrimtuneError(f"adapter {path} does not fit this model (unexpected tensors "
                            f"{unexpected[:3]}, trained tensors missing {missing[:3]}): load it "
                            "onto the base it was trained on")
    return model


def load_run(run_dir: str | Path) -> nn.Module:
    """Rebuild a fine-tuned model from a run folder: base + method + adapter tensors."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    try:
        cfg = FinetuneConfig.from_dict(run["config"])
        base = run["base"]
    except (KeyError, TypeError) as e:
        raise TrimtuneError(f"{run_dir / 'run.json'} is incomplete or from another version "
                            f"({e}); re-run `trimtune finetune`") from e
    if "model" in base:
        spec = base["model"]
        if (run_dir / spec).is_dir():  # the base kept inside the run folder
            spec = str(run_dir / spec)
        check_identity(base, run_dir)
        model = load_model(spec, num_classes=base.get("num_classes"),
                           img_size=base.get("img_size"), weights=base.get("weights"))
        if base.get("segmenter"):  # a segmentation run on a named backbone: its decode head
            from .heads import segmenter
            model = segmenter(model, **base["segmenter"])
    else:
        model = build_from_arch(base["arch"])
        if base.get("compressed"):
            factorise_like(model, base["compressed"]["ranks"])
    adapter = run_dir / ADAPTER
    try:
        if registry.get(cfg.method).peft:
            load_adapter(model, adapter)
        elif (adapter / RECORD).is_file():  # LoRA / DoRA / AdaLoRA, saved by PEFT's rules
            model, _ = prepare(model, cfg, total_steps=1)
            load_peft_tensors(model, adapter)
        else:
            state = read_safetensors(adapter / "adapter_model.safetensors")
            model, _ = prepare(model, cfg, total_steps=1)
            _, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise TrimtuneError(f"adapter in {run_dir} does not fit its base: unexpected "
                                    f"tensors {unexpected[:5]}; was run.json edited?")
    except RuntimeError as e:  # torch: size mismatch of a tensor
        shape = str(e).split("size mismatch for ", 1)[-1].split("\n")[0][:160]
        raise TrimtuneError(f"adapter in {run_dir} does not fit the base {base.get('model', '')}"
                            f" ({shape}): the base is not the model this run was trained on; "
                            "restore that base or fine-tune again") from e
    model.eval()
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the fine-tuned update into the base weights: a plain model, no extra cost
    (:func:`trimtune.tuners.registry.merge`, for every method)."""
    return registry.merge(model)


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """A plain (merged or compressed) model folder: model.safetensors + trimtune.json."""
    return save_compressed(model, out_dir, allow_dense=True)


__all__ = ["base_spec", "check_identity", "identity", "input_size", "load", "load_model",
           "load_run", "merge", "save", "save_model", "state_sha256", "with_identity"]
