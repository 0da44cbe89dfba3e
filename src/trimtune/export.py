"""``export``: a merged model in files that stock tools read exactly.

* ``"timm"``: ``config.json`` + ``model.safetensors`` written by timm's own hub-format writer
  (``timm.models.save_for_hf``), so ``timm.create_model("local-dir:DIR", pretrained=True)``
  rebuilds the architecture (kwargs included) and loads every weight, head included. Only a
  dense model: stock timm cannot build factorised (compressed) layers, so a compressed model
  is refused here; keep it as a trimtune folder (``trimtune merge``, read back by
  ``trimtune.load_model(DIR)``) or export it to ONNX.
* ``"transformers"``: a transformers model (Python API) through its own ``save_pretrained``,
  read back by ``from_pretrained`` of its class; dense models only, as for timm.
* ``"onnx"``: ``model.onnx`` (dense or compressed; batch axis dynamic) + ``data_config.json``
  (input size, mean, std, interpolation), checked against ONNX Runtime when it is installed
  (``pip install trimtune[export]``).

Every export is verified before it is kept: the stock tool reloads it and its output on a
probe batch must match the merged model (timm: 1e-5, ONNX Runtime: 1e-4), else a
:class:`~trimtune.errors.TrimtuneError` and nothing is written. Files appear in ``out_dir``
only once complete (written to a temporary folder beside it, then renamed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import check_space, tensor_bytes, write_json
from .errors import TrimtuneError
from .lowrank import is_compressed
from .models import arch_of
from .models.probe import example_input

FORMATS = ("timm", "onnx", "transformers")
__all__ = ["export", "FORMATS"]


def export(source: str | os.PathLike | nn.Module, out_dir: str | os.PathLike,
           format: str = "timm", *, example: Any = None, opset: int = 17) -> Path:
    """Write ``source``, merged, to ``out_dir`` in ``format``; returns ``out_dir``.

    Args:
        source: a fine-tuning run folder, a trimtune model folder, a timm / zoo name, or a
            model (an attached adapter is merged into it, in place).
        out_dir: the folder to write (created; files of the same names are replaced).
        format: ``"timm"``, ``"onnx"`` or ``"transformers"``.
        example: the model's input for the checks and the ONNX trace (default: a random batch
            of two at the model's input size).
        opset: ONNX opset.
    """
    if format not in FORMATS:
        raise TrimtuneError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    from .runs import load_model, merge
    from .tuners.registry import method_of

    model = source if isinstance(source, nn.Module) else load_model(str(source))
    if method_of(model) is not None:  # an adapter attached: fold it (the one merge)
        model = merge(model)
    model.eval()
    x = example if example is not None else example_input(model, batch_size=2)
    if x is None:
        raise TrimtuneError(f"cannot build an example input for this {type(model).__name__}: "
                            "pass example=<input tensor> to export()")
    with torch.no_grad():
        want = model(**x) if isinstance(x, dict) else model(x)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the stock writers write the weights themselves: room for them is checked first
    check_space(out / "model", tensor_bytes(model.state_dict()) + 1024 * 1024)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if format == "timm":
            _write_timm(model, tmp, x, want)
        elif format == "transformers":
            _write_transformers(model, tmp, x, want)
        else:
            _write_onnx(model, tmp, x, want, opset)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_timm(model: nn.Module, tmp: Path, x: torch.Tensor, want: torch.Tensor) -> None:
    import timm
    from timm.models import save_for_hf

    if is_compressed(model):
        raise TrimtuneError("stock timm cannot build a compressed (factorised) model: export it "
                            "with --format onnx, or keep the trimtune folder (`trimtune merge`) "
                            "and read it with trimtune.load_model(DIR)")
    if not getattr(model, "pretrained_cfg", None):
        raise TrimtuneError(f"this {type(model).__name__} is not a timm model (no pretrained_cfg):"
                            " export it with --format onnx")
    save_for_hf(model, str(tmp), model_args=arch_of(model)["kwargs"], safe_serialization=True)
    try:  # the stock loader, exactly as a user calls it
        back = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        with torch.no_grad():
            got = back(x)
    except Exception as e:  # noqa: BLE001 - one clear line
        raise TrimtuneError(f"stock timm could not read the export back ({type(e).__name__}: "
                            f"{e}): this model cannot be exported to timm format") from e
    _check(got, want, 1e-5, "timm.create_model('local-dir:...')")


def _write_transformers(model: nn.Module, tmp: Path, x: Any, want: Any) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(type(model), "from_pretrained"):
        raise TrimtuneError(f"this {type(model).__name__} is not a transformers model: export it "
                            "with --format timm or onnx")
    if is_compressed(model):
        raise TrimtuneError("transformers cannot build a compressed (factorised) model: "
                            "from_pretrained would re-initialise its factors; export it with "
                            "--format onnx, or keep it as a trimtune folder "
                            "(trimtune.save_compressed, read by trimtune.load_compressed)")
    model.save_pretrained(str(tmp), safe_serialization=True)
    back = type(model).from_pretrained(str(tmp)).eval()
    with torch.no_grad():
        got = back(**x) if isinstance(x, dict) else back(x)
    _check(_first(got), _first(want), 1e-5, f"{type(model).__name__}.from_pretrained")


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _write_onnx(model: nn.Module, tmp: Path, x: torch.Tensor, want: torch.Tensor,
                opset: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(want, torch.Tensor):
        raise TrimtuneError(f"ONNX export takes a model of one tensor in, one tensor out (a timm "
                            f"model); this {type(model).__name__} is not: use "
                            "torch.onnx.export with its own input names")
    path = tmp / "model.onnx"
    try:
        with warnings.catch_warnings():  # the tracer's notes on timm's shape asserts
            warnings.simplefilter("ignore")
            # the TorchScript exporter: the plain (merged) modules need nothing more, and the
            # dynamo one would need onnxscript
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - one clear line
        raise TrimtuneError(f"ONNX export of this {type(model).__name__} failed "
                            f"({type(e).__name__}: {e})") from e
    if getattr(model, "pretrained_cfg", None) or hasattr(model, "patch_embed"):
        from .data.transforms import data_config

        cfg = data_config(model)
        write_json(tmp / "data_config.json", {k: cfg[k] for k in
                                              ("input_size", "mean", "std", "interpolation",
                                               "crop_pct") if k in cfg})
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed, so the ONNX export was not checked: "
                      "pip install 'trimtune[export]'", stacklevel=3)
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.detach().cpu().numpy()})[0])
    _check(got, want.cpu(), 1e-4, "ONNX Runtime")


def _check(got: torch.Tensor, want: torch.Tensor, tol: float, who: str) -> None:
    err = float((got.float() - want.float()).abs().max())
    if got.shape != want.shape or not err <= tol:
        raise TrimtuneError(f"{who} reads the export back with a different output (max |diff| "
                            f"{err:.2e} > {tol:g}, shapes {tuple(got.shape)} vs "
                            f"{tuple(want.shape)}): not written")
