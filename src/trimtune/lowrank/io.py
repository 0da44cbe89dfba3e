"""The compressed-model format: a folder with ``model.safetensors`` and ``trimtune.json``.

``trimtune.json`` holds everything needed to rebuild the module tree without the original
model or a download: the timm architecture and its kwargs, the number of classes, the rank of
every factorised layer, the rank policy, the skip patterns, the factor init and its calibration
data (``init``; files written before it existed load as ``{"method": "svd"}``), the package and
format versions.

A Hugging Face transformers model is saved the same way, its architecture recorded as its class
name and ``config.to_dict()``, plus its ``config.json``; its weights are named
``trimtune_model.safetensors`` (:data:`TRANSFORMERS_WEIGHTS_NAME`, recorded in ``trimtune.json``),
a name stock ``from_pretrained`` does not read: it refuses the folder ("no file named
model.safetensors") instead of silently re-initialising every factorised layer.
Below :mod:`.compress` (which routes every compressed model's ``save_pretrained`` here); this
module reads and writes the format and never imports ``compress``.
``compress`` / ``load_compressed`` also route the compressed model's own ``save_pretrained``
(what HF ``Trainer`` calls) to :func:`save_compressed`.
"""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_json, read_safetensors, write_json, write_safetensors
from ..errors import TrimtuneError
from ..models import arch_of, build_from_arch, is_transformers_model
from ..models.probe import route_through_modules
from .layers import LowRankLinear, factorised_layers

FORMAT = "trimtune.compressed"
FORMAT_VERSION = 1
CONFIG_NAME = "trimtune.json"
WEIGHTS_NAME = "model.safetensors"
#: a compressed transformers model's weights: a name transformers' from_pretrained never reads
TRANSFORMERS_WEIGHTS_NAME = "trimtune_model.safetensors"
#: weight files transformers' from_pretrained would read instead of ours
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
REQUIRED = ("format", "format_version", "arch", "ranks")

__all__ = ["save_compressed", "load_compressed", "factorise_like", "route_save_pretrained",
           "weights_file", "get_arch", "FORMAT_VERSION"]


def get_arch(model: nn.Module) -> dict:
    """A copy of ``trimtune.models.arch_of(model)``. Raises TrimtuneError if it cannot be told."""
    return copy.deepcopy(arch_of(model))


def weights_file(directory: str | os.PathLike) -> Path:
    """The weight file of a model folder :func:`save_compressed` wrote (``trimtune.json``'s
    ``weights``: ``model.safetensors``, or :data:`TRANSFORMERS_WEIGHTS_NAME`)."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_NAME)
    name = config.get("weights", WEIGHTS_NAME) if isinstance(config, dict) else WEIGHTS_NAME
    if name not in (WEIGHTS_NAME, TRANSFORMERS_WEIGHTS_NAME):
        raise TrimtuneError(f"{directory / CONFIG_NAME}: unknown weights file {name!r}; re-save "
                            "the model")
    return directory / name


def factorise_like(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace, in place, each listed ``nn.Linear`` by an (uninitialised) LowRankLinear of the
    given rank, so a compressed state dict can be loaded into a freshly built ``model``.

    Args:
        model: a dense model of the recorded architecture.
        ranks: ``{qualified layer name: rank}`` (``model.trimtune_lowrank["ranks"]``).

    Returns:
        ``model``. Raises TrimtuneError if a name is not a linear layer or a rank does not fit.
    """
    route_through_modules(model)  # as compress() did: e.g. EVA's qkv called, not read
    modules = dict(model.named_modules())
    for name, r in ranks.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise TrimtuneError(f"{CONFIG_NAME} lists layer {name!r}, which is not a linear layer "
                                "of this architecture: the file is damaged; re-save the model")
        full = min(lin.in_features, lin.out_features)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
            raise TrimtuneError(f"{CONFIG_NAME}: rank {r!r} of {name!r} does not fit its "
                                f"{lin.in_features}->{lin.out_features} shape (1..{full}): "
                                "the file is damaged; re-save the model")
        w = lin.weight
        new = LowRankLinear(lin.in_features, lin.out_features, r, bias=lin.bias is not None,
                            device=w.device, dtype=w.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    return model


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                 where: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise TrimtuneError(
            f"{where} does not match the architecture in {CONFIG_NAME}: missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; re-save the model")
    bad = [(k, tuple(got[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(got[k].shape) != tuple(v.shape)]
    if bad:
        k, g, e = bad[0]
        raise TrimtuneError(f"{where}: tensor {k!r} has shape {g}, the architecture expects {e} "
                            f"({len(bad)} mismatched); the files do not belong together; "
                            "re-save the model")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. tied input / output embeddings) cloned:
    safetensors stores no shared storage; loading fills the tied parameter twice, equally."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        out[k] = v.clone() if key in seen and v.numel() else v
        seen.add(key)
    return out


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args,
                     is_main_process: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a compressed transformers model: trimtune's format (stock
    ``from_pretrained`` cannot rebuild factorised layers), reloaded exactly by
    :func:`load_compressed`. transformers' other arguments do not apply and are ignored."""
    if is_main_process:
        save_compressed(self, save_directory, allow_dense=True)


def route_save_pretrained(model: nn.Module) -> nn.Module:
    """Make a compressed transformers model's own ``save_pretrained`` write trimtune's format
    (:func:`save_compressed`); other models are left as they are. Returns ``model``."""
    if is_transformers_model(model) and factorised_layers(model):
        model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def save_compressed(model: nn.Module, directory: str | os.PathLike, *,
                    allow_dense: bool = False) -> Path:
    """Write ``model.safetensors`` + ``trimtune.json`` (atomically) into ``directory``.

    ``allow_dense=True`` also writes a model with no factorised layer (e.g. a merged,
    uncompressed fine-tune) in the same format, marked ``"dense": true``; its
    ``model.safetensors`` is then a plain timm state dict.

    The architecture must be known (``model.trimtune_arch``, set by ``create_backbone`` and
    kept by ``compress``; a transformers model's class and config); it is checked by rebuilding
    the tree on the meta device. A transformers model's folder also gets its ``config.json``
    and :data:`TRANSFORMERS_WEIGHTS_NAME` (see the module docstring); a folder that already
    holds transformers weights (``model.safetensors``...) is refused.
    """
    from .. import __version__

    layers = factorised_layers(model)
    if not layers and not allow_dense:
        raise TrimtuneError("the model has no factorised layer: run trimtune.compress(model) "
                            "first (a dense model is saved with the usual timm tools)")
    arch = get_arch(model)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        arch.setdefault("kwargs", {}).setdefault("num_classes", int(num_classes))
    record = copy.deepcopy(getattr(model, "trimtune_lowrank", None) or {})
    ranks = {n: m.rank for n, m in layers.items()}
    state = model.state_dict()
    with torch.device("meta"):
        ref = build_from_arch(arch)
    factorise_like(ref, ranks)
    _check_state(ref.state_dict(), state, "the model")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "trimtune_version": __version__,
        "arch": arch,
        "num_classes": num_classes,
        "ranks": ranks,
        "policy": record.get("policy"),
        "skip": record.get("skip"),
        "energy": record.get("energy"),
        "init": record.get("init") or ({"method": "svd"} if layers else None),
        "dense": not layers,
    }
    directory = Path(directory)
    hf = arch.get("library") == "transformers"
    if hf:
        stale = [f for f in _HF_WEIGHT_FILES if (directory / f).exists()]
        if stale:
            raise TrimtuneError(f"{directory} holds {stale[0]}: stock from_pretrained would read "
                                "it instead of this compressed model; save into another folder")
        config["weights"] = TRANSFORMERS_WEIGHTS_NAME
    directory.mkdir(parents=True, exist_ok=True)
    # weights first, trimtune.json last: a folder whose trimtune.json exists is complete
    write_safetensors(directory / config.get("weights", WEIGHTS_NAME), _unshared(dict(state)),
                      metadata={"format": "pt", "trimtune_format": FORMAT})
    if hf:
        write_json(directory / "config.json", {
            **model.config.to_dict(),
            "trimtune": "compressed by trimtune (factorised layers): transformers cannot rebuild "
                        "it; load it with trimtune.load_compressed(DIR)"})
    write_json(directory / CONFIG_NAME, config)
    return directory


def load_compressed(directory: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> nn.Module:
    """Rebuild a compressed model from ``directory`` alone (no download) and load its weights
    strictly. Raises TrimtuneError naming the problem if a file is missing or damaged."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TrimtuneError(f"{directory} is not a folder: pass the folder save_compressed wrote")
    config = read_json(directory / CONFIG_NAME)
    if not isinstance(config, dict):
        raise TrimtuneError(f"{directory / CONFIG_NAME} is not a trimtune record; re-save it")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise TrimtuneError(f"{directory / CONFIG_NAME} lacks field(s) {missing}: the file is "
                            "damaged or not written by save_compressed; re-save the model")
    if config["format"] != FORMAT:
        raise TrimtuneError(f"{directory / CONFIG_NAME} has format {config['format']!r}, not "
                            f"{FORMAT!r}: load it with the matching trimtune function")
    if config["format_version"] != FORMAT_VERSION:
        raise TrimtuneError(f"format version {config['format_version']!r} is not supported (this "
                            f"trimtune reads {FORMAT_VERSION}): upgrade trimtune or re-save")
    ranks = config["ranks"]
    if not isinstance(ranks, dict) or (not ranks and not config.get("dense")):
        raise TrimtuneError(f"{directory / CONFIG_NAME}: 'ranks' must be a non-empty "
                            "{layer: rank} mapping; re-save the model")
    arch = copy.deepcopy(config["arch"])
    num_classes = config.get("num_classes")
    if isinstance(arch, dict) and num_classes is not None:
        arch.setdefault("kwargs", {}).setdefault("num_classes", num_classes)
    model = build_from_arch(arch)
    factorise_like(model, ranks)
    weights = weights_file(directory)
    state = read_safetensors(weights)
    _check_state(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    model.trimtune_arch = arch
    model.trimtune_lowrank = {"ranks": dict(ranks), "policy": config.get("policy"),
                              "skip": config.get("skip"), "energy": config.get("energy") or {},
                              "kept_dense": {},
                              "init": config.get("init") or {"method": "svd"}}
    route_save_pretrained(model)
    return model.to(device).eval()
