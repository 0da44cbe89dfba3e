"""Where backbones come from: timm names, local weight files, and the offline zoo.

One factory verb, :func:`create_backbone`, returns a plain timm model carrying
``model.trimtune_arch = {"arch": <timm name>, "kwargs": {...}}`` so that
:func:`build_from_arch` can rebuild the same architecture (random init, no download) when a
compressed model or an adapter is loaded back. A Hugging Face transformers model is recorded as
``{"library": "transformers", "class": <class name>, "config": config.to_dict()}`` and rebuilt
by ``<class>._from_config`` (:func:`arch_of` / :func:`build_from_arch`).
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..checkpoint import read_safetensors
from ..errors import TrimtuneError
from .zoo import ZOO, ZooEntry, cached_weights

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_NESTED_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict")


# ----------------------------------------------------------------------------- public API

def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    seed: int | None = 0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create a (pre-trained) backbone as a plain timm model.

    The same call gives the same model in every process: whatever is randomly initialised (a
    fresh classifier head; every weight with ``pretrained=False``) is drawn from
    ``torch.manual_seed(seed)`` in a forked RNG, so the global RNG is neither read nor advanced.

    Args:
        name: a timm architecture (``timm.list_models()``, optionally with a ``.tag``) or an
            offline zoo name (:func:`list_zoo`, e.g. ``"dinov2_small.imgfocus"``).
        pretrained: load pre-trained weights (timm hub for timm names, the converted cache for
            zoo names); ``False`` gives random init and never touches disk or network.
        weights: a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict (possibly nested
            under ``"model"`` / ``"state_dict"``) to load into ``name``'s architecture; the
            head is dropped when ``num_classes`` differs and the position embedding resampled
            when ``img_size`` differs.
        num_classes: size of a fresh classifier head (``0``: no head, features only).
        img_size: input resolution (square); must be divisible by the patch size.
        seed: seed of that random initialisation (default 0); ``None`` draws it from (and
            advances) the global RNG, as ``timm.create_model`` does.
        **timm_kwargs: passed straight to ``timm.create_model`` (``drop_path_rate=0.1``...).

    Returns:
        The model, with ``model.trimtune_arch`` set and ``model.pretrained_cfg`` holding the
        mean / std / ``input_size`` (3, img_size, img_size) for ``timm.data.resolve_data_config``.
    """
    if not isinstance(name, str) or not name:
        raise TrimtuneError(f"model name must be a non-empty string, got {name!r}")
    if seed is None:
        return _create_backbone(name, pretrained, weights, num_classes, img_size, timm_kwargs)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TrimtuneError(f"seed={seed!r} is not an integer: give e.g. seed=0, or None for "
                            "the global RNG")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _create_backbone(name, pretrained, weights, num_classes, img_size, timm_kwargs)


def _create_backbone(name: str, pretrained: bool, weights: str | os.PathLike | None,
                     num_classes: int | None, img_size: int | None,
                     timm_kwargs: dict[str, Any]) -> nn.Module:
    """:func:`create_backbone` under whatever RNG state is current."""
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)

    if name in ZOO:
        entry = ZOO[name]
        kwargs.setdefault("img_size", entry.default_img_size)
        kwargs.setdefault("num_classes", 0)
        kwargs = {**entry.arch_kwargs, **kwargs}
        _check_img_size(name, kwargs["img_size"], entry.patch_size)
        model = _create(entry.arch, False, kwargs)
        if weights is not None:
            _load_weight_file(model, weights, entry.arch)
        elif pretrained:
            sd = read_safetensors(cached_weights(name))
            _load_state_dict_checked(model, sd, source=f"zoo entry {name}", arch=entry.arch)
        _set_pretrained_cfg(model, entry)
        model.trimtune_arch = {"arch": entry.arch, "kwargs": _jsonable(kwargs)}
        return model

    arch, _tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(name):
        raise TrimtuneError(_unknown_name_message(name))
    input_size = _check_img_size_for_arch(arch, kwargs)  # pops img_size if arch has none

    if weights is not None:
        model = _create(arch, False, kwargs)
        _load_weight_file(model, weights, arch)
    elif pretrained:
        model = _create_from_hub(name, kwargs)
    else:
        model = _create(name, False, kwargs)
    record = {"arch": arch, "kwargs": _jsonable(kwargs)}
    if input_size is not None:
        _set_input_size(model, input_size)
        if "img_size" not in kwargs:
            record["img_size"] = input_size  # data config only (e.g. a CNN)
    model.trimtune_arch = record
    return model


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face transformers ``PreTrainedModel`` (never imports transformers itself)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


TRANSFORMERS = "transformers"


def _transformers_arch(model: nn.Module) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return {"library": TRANSFORMERS, "class": type(model).__name__, "config": config}


def _build_transformers(arch: dict) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise TrimtuneError(f"this model is a transformers {arch.get('class')}: pip install "
                            "transformers to load it") from e
    cls = getattr(transformers, str(arch.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(arch.get("config"), dict)):
        raise TrimtuneError(f"transformers {transformers.__version__} has no model class "
                            f"{arch.get('class')!r} (or the record has no config): load it with "
                            "the transformers version that saved it, or re-save it")
    model = cls._from_config(cls.config_class.from_dict(arch["config"]))
    model.trimtune_arch = copy.deepcopy(arch)
    return model


def build_from_arch(arch: dict) -> nn.Module:
    """Rebuild an architecture from ``model.trimtune_arch`` with random weights (no download).

    Args:
        arch: ``{"arch": <timm name>, "kwargs": {...}}`` or a transformers record
            (``{"library": "transformers", "class", "config"}``), as returned by :func:`arch_of`.
    """
    if isinstance(arch, dict) and arch.get("library") == TRANSFORMERS:
        return _build_transformers(arch)
    if isinstance(arch, dict) and arch.get("arch") == "trimtune.segmenter":
        from ..heads.segmentation import build_segmenter  # backbone + decode head

        return build_segmenter(arch)
    if not isinstance(arch, dict) or not isinstance(arch.get("arch"), str):
        raise TrimtuneError(f"architecture record must be {{'arch': name, 'kwargs': {{...}}}}, "
                            f"got {arch!r}; re-save the model with this trimtune version")
    name, kwargs = arch["arch"], dict(arch.get("kwargs") or {})
    if not timm.is_model(name):
        raise TrimtuneError(_unknown_name_message(name))
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    model = _create(name, False, kwargs)
    size = kwargs.get("img_size", arch.get("img_size"))
    if size is not None:
        _set_input_size(model, size)
    model.trimtune_arch = copy.deepcopy({**arch, "kwargs": _jsonable(kwargs)})
    return model


def arch_of(model: nn.Module) -> dict:
    """The ``{"arch", "kwargs"}`` record that rebuilds ``model``'s architecture.

    Returns ``model.trimtune_arch`` when set; for a plain timm model it is inferred from
    ``model.pretrained_cfg["architecture"]``, ``num_classes``, and (for ViTs) img/patch size,
    width, depth, heads..., then checked by building the record on the meta device and comparing
    every parameter name and shape. A transformers model: its class name and
    ``config.to_dict()``.
    """
    rec = getattr(model, "trimtune_arch", None)
    if rec is not None:
        return copy.deepcopy(rec)
    if is_transformers_model(model):
        return _transformers_arch(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name or not timm.is_model(name):
        raise TrimtuneError(
            f"cannot tell which architecture this {type(model).__name__} is (no timm "
            f"pretrained_cfg['architecture']); create it with trimtune.create_backbone(...) or "
            f"set model.trimtune_arch = {{'arch': <timm name>, 'kwargs': {{...}}}}")
    kwargs = _infer_kwargs(model, name)
    # layers factorised by trimtune.lowrank hold other keys: compare everything else
    lowrank = tuple(f"{n}." for n in
                    (getattr(model, "trimtune_lowrank", None) or {}).get("ranks", {}))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(lowrank)}
    try:
        with torch.device("meta"):
            built = timm.create_model(name, pretrained=False, **kwargs)
        got = {k: tuple(v.shape) for k, v in built.state_dict().items()
               if not (lowrank and k.startswith(lowrank))}
    except Exception as e:  # a kwarg this architecture does not take
        got, err = {}, e
    else:
        err = None
    if got != want:
        diff = _diff_message(want, got) if err is None else str(err)
        raise TrimtuneError(
            f"cannot infer the kwargs of this {name} (tried {kwargs}: {diff}); create it with "
            f"trimtune.create_backbone({name!r}, ...) or set model.trimtune_arch")
    return {"arch": name, "kwargs": kwargs}


def load_weights(model: nn.Module, weights: str | os.PathLike) -> nn.Module:
    """Load a local weight file into an existing timm model (head dropped / pos-embed resampled
    as in :func:`create_backbone`). Returns the model."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    _load_weight_file(model, weights, arch)
    return model


# ----------------------------------------------------------------------------- helpers

def _jsonable(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _unknown_name_message(name: str) -> str:
    candidates = list(ZOO) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `trimtune models`"
    if Path(name).suffix in WEIGHT_SUFFIXES or Path(name).exists():
        hint = "to load a local file pass the architecture and weights=FILE"
    return (f"unknown model {name!r}: {hint} (any timm.list_models() name or a zoo name: "
            f"{', '.join(ZOO)})")


def _check_img_size(name: str, img_size: Any, patch: int) -> None:
    sizes = img_size if isinstance(img_size, (tuple, list)) else (img_size,)
    for s in sizes:
        if not isinstance(s, int) or s <= 0:
            raise TrimtuneError(f"img_size must be a positive int, got {img_size!r}")
        if s % patch:
            lo, hi = (s // patch) * patch, (s // patch + 1) * patch
            near = f"{lo} or {hi}" if lo else f"{hi}"
            raise TrimtuneError(f"img_size {s} is not divisible by {name}'s patch size {patch}: "
                                f"use {near}")


def _check_img_size_for_arch(arch: str, kwargs: dict) -> Any:
    """Build ``arch`` on the meta device (cheap) and check img_size against its patch size.

    Pops ``img_size`` from ``kwargs`` when the architecture takes none (most CNNs) and returns
    it, so that it still sets the data config; returns None when no img_size was asked for.
    """
    if "img_size" not in kwargs:
        return None
    try:
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            return kwargs["img_size"]  # let the real build report the bad kwarg
        return kwargs.pop("img_size")
    except Exception:  # let the real build report bad kwargs
        return kwargs["img_size"]
    patch = getattr(getattr(m, "patch_embed", None), "patch_size", None)
    if patch is not None and not getattr(m.patch_embed, "dynamic_img_pad", False):
        _check_img_size(arch, kwargs["img_size"], int(patch[0]))
    return kwargs["img_size"]


def _create(name: str, pretrained: bool, kwargs: dict, **extra: Any) -> nn.Module:
    """``timm.create_model`` with bad kwargs reported as a TrimtuneError."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except TypeError as e:
        raise TrimtuneError(f"{name} does not take these arguments ({e}); remove them or see "
                            f"the timm model's signature") from e


def _offline() -> bool:
    def true(v: str | None) -> bool:
        return (v or "").strip().lower() in {"1", "true", "yes", "on"}
    if true(os.environ.get("HF_HUB_OFFLINE")) or true(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _offline_message(name: str, why: str) -> str:
    return (f"cannot download pre-trained weights for {name} ({why}): use an offline zoo model "
            f"({', '.join(ZOO)}), weights=FILE with a local weight file, or pretrained=False")


def _local_hub_file(cfg: dict) -> str | None:
    """A locally cached weight file for ``cfg`` (HF cache or torch hub cache), or None."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
                hit = try_to_load_from_cache(hub_id, fname)
                if isinstance(hit, str):
                    return hit
        except Exception:  # pragma: no cover - very old huggingface_hub
            pass
    url = cfg.get("url")
    if url:
        hit = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if hit.is_file():
            return str(hit)
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for mod, attr in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errs.append(getattr(__import__(mod), attr))
        except Exception:  # pragma: no cover
            pass
    return tuple(errs)


def _create_from_hub(name: str, kwargs: dict) -> nn.Module:
    """timm ``pretrained=True``; offline mode uses only locally cached files."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    if not (cfg_dict.get("hf_hub_id") or cfg_dict.get("url") or cfg_dict.get("file")):
        raise TrimtuneError(_offline_message(name, "timm has no pre-trained weights for it"))
    if _offline():
        local = _local_hub_file(cfg_dict)
        if local is None:
            raise TrimtuneError(_offline_message(name, "HF_HUB_OFFLINE is set and they are "
                                                       "not in the local cache"))
        overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": local}
        return _create(name, True, kwargs, pretrained_cfg_overlay=overlay)
    try:
        return _create(name, True, kwargs)
    except _network_errors() as e:
        raise TrimtuneError(_offline_message(name, f"{type(e).__name__}: "
                                                   f"{str(e).splitlines()[0][:120]}")) from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TrimtuneError(f"weight file {path} not found: check the path")
    if path.suffix == ".safetensors":
        sd: Any = read_safetensors(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrimtuneError(f"{path} is not a readable torch state dict ({type(e).__name__}); "
                                f"save it with torch.save(model.state_dict(), path)") from e
    else:
        raise TrimtuneError(f"weight file {path} has suffix {path.suffix!r}: use one of "
                            f"{', '.join(WEIGHT_SUFFIXES)}")
    for key in _NESTED_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise TrimtuneError(f"{path} holds a {type(sd).__name__}, not a state dict: save "
                            f"model.state_dict()")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _resample_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Resample ``sd["pos_embed"]`` (1, prefix + H*W, C) in place to the model's patch grid."""
    pe, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pe is None or not isinstance(own, torch.Tensor) or pe.shape == own.shape:
        return
    if pe.ndim != 3 or pe.shape[-1] != own.shape[-1]:
        return  # another architecture: reported by the key/shape check
    no_embed_class = getattr(model, "no_embed_class", False)
    prefix = 0 if no_embed_class else getattr(model, "num_prefix_tokens", 1)
    old = pe.shape[1] - prefix
    if int(old ** 0.5) ** 2 != old:
        return
    sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(model.patch_embed.grid_size),
                                             num_prefix_tokens=prefix, antialias=False)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    cls = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(c + "." for c in cls)


def _diff_message(want: dict, got: dict, n: int = 3) -> str:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k} file {list(got[k])} vs model {list(want[k])}"
              for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f", +{len(items) - n} more" if len(items) > n else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:n])}{more})")
    return "; ".join(parts)


def _load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                             arch: str) -> None:
    """Load ``sd`` strictly, except a head whose shape differs (left freshly initialised)."""
    sd = dict(sd)
    _resample_pos_embed(model, sd)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    own = model.state_dict()
    if filt is not None and set(sd) != set(own):
        try:  # converts original-repo layouts (e.g. Meta's DINOv2) into timm's
            sd = filt(sd, model)
        except Exception:
            pass
    heads = _classifier_prefixes(model)
    for k in list(sd):
        if k.startswith(heads) and (k not in own or own[k].shape != sd[k].shape):
            del sd[k]  # another num_classes: keep the fresh head
    want = {k: tuple(v.shape) for k, v in own.items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    got_cmp = {**got, **{k: v for k, v in want.items() if k.startswith(heads) and k not in got}}
    if got_cmp != want:
        raise TrimtuneError(f"{source} does not fit {arch}: {_diff_message(want, got_cmp)}; "
                            f"pass the architecture (and kwargs such as depth=, embed_dim=) the "
                            f"file was saved from")
    model.load_state_dict(sd, strict=False)


def _load_weight_file(model: nn.Module, weights: str | os.PathLike, arch: str) -> None:
    path = Path(weights).expanduser()
    _load_state_dict_checked(model, _read_state_dict(path), source=str(path), arch=arch)


def _set_input_size(model: nn.Module, img_size: Any) -> None:
    hw = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, *hw)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def _set_pretrained_cfg(model: nn.Module, entry: ZooEntry) -> None:
    """Data config for a zoo model: its mean/std and the size it was built at."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hw = tuple(model.patch_embed.img_size)
    cfg.update(architecture=entry.arch, mean=entry.mean, std=entry.std, input_size=(3, *hw),
               num_classes=getattr(model, "num_classes", 0), tag=entry.name.split(".", 1)[-1],
               hf_hub_id=None, url=None, source=entry.source, license=entry.license)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def _vit_attrs(m: nn.Module) -> dict:
    """Structural kwargs of a timm VisionTransformer read from the module."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(m, VisionTransformer):
        return {}
    b0 = m.blocks[0] if len(m.blocks) else None
    out: dict[str, Any] = dict(
        img_size=tuple(m.patch_embed.img_size), patch_size=tuple(m.patch_embed.patch_size),
        embed_dim=m.embed_dim, depth=len(m.blocks), global_pool=m.global_pool,
        class_token=m.cls_token is not None, reg_tokens=m.num_reg_tokens,
        no_embed_class=m.no_embed_class,
    )
    if b0 is not None:
        out["num_heads"] = getattr(b0.attn, "num_heads", None)
        fc1 = getattr(b0.mlp, "fc1", None)
        if isinstance(fc1, nn.Linear):
            out["mlp_ratio"] = fc1.out_features / m.embed_dim
        qkv = getattr(b0.attn, "qkv", None)
        if isinstance(qkv, nn.Linear):
            out["qkv_bias"] = qkv.bias is not None
        out["init_values"] = None if isinstance(b0.ls1, nn.Identity) else 1e-5
    return out


def _infer_kwargs(model: nn.Module, name: str) -> dict:
    """Kwargs in which ``model`` differs from ``timm.create_model(name)``'s defaults."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    kwargs: dict[str, Any] = {}
    if getattr(model, "num_classes", None) != getattr(ref, "num_classes", None):
        kwargs["num_classes"] = model.num_classes
    mine, theirs = _vit_attrs(model), _vit_attrs(ref)
    for k, v in mine.items():
        if theirs.get(k) != v and not (k == "init_values" and (v is None) == (theirs[k] is None)):
            kwargs[k] = v
    for k in ("img_size", "patch_size"):
        if k in kwargs and kwargs[k][0] == kwargs[k][1]:
            kwargs[k] = kwargs[k][0]
    return _jsonable(kwargs)


def set_drop_path_rate(model: nn.Module, rate: float) -> nn.Module:
    """Backbone stochastic depth after creation, as timm's ``drop_path_rate``: block ``i`` of
    ``n`` drops its residual branches with probability ``rate * i / (n - 1)`` (timm's linear
    decay rule; the authors' ``--drop-path``). In place; ``rate = 0`` removes it.

    Works on models with ``blocks`` whose items hold ``drop_path``/``drop_path1``/
    ``drop_path2`` (timm ViT, DeiT, DINOv2, EVA, BEiT...).

    Raises:
        TrimtuneError: ``rate`` outside [0, 1), or a model without such blocks.
    """
    from timm.layers import DropPath

    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise TrimtuneError(f"drop-path rate {rate} is outside [0, 1): use e.g. 0.1, or 0 "
                            "to turn stochastic depth off")
    blocks = list(getattr(model, "blocks", None) or [])
    slots = [(i, blk, n) for i, blk in enumerate(blocks) for n in ("drop_path", "drop_path1",
                                                                  "drop_path2")
             if isinstance(getattr(blk, n, None), (DropPath, nn.Identity))]
    if not slots:
        raise TrimtuneError(f"{type(model).__name__} has no `blocks` with drop_path modules: "
                            "backbone drop-path works on timm ViT-style models; pass "
                            "drop_path_rate=... to timm.create_model for others, or use 0")
    n = len(blocks)
    for i, blk, name in slots:
        p = rate * i / max(1, n - 1)
        setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model
