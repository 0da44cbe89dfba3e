"""The one writer of Hugging Face PEFT adapter folders (SNELL / SNELLA, LoRA, DoRA, AdaLoRA).

``adapter_config.json``: the config's ``to_dict()`` (``peft_type`` as its value), exactly what
``PeftConfig.save_pretrained`` writes, so ``PeftConfig.from_pretrained`` reads it without
warnings; ``adapter_model.safetensors``: the adapter state under PEFT's keys
(``base_model.model.<module>...``). Writes are atomic and deterministic (sorted keys, sets as
sorted lists), so two same-seed runs give byte-identical folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_json, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def write_peft_folder(path: str | os.PathLike, state: dict[str, torch.Tensor], config: Any,
                      metadata: dict[str, str], **overrides: Any) -> Path:
    """Write ``state`` (keys with or without :data:`PEFT_PREFIX`) and ``config`` (a PEFT
    config; ``overrides`` replace entries of its ``to_dict()``) as a PEFT adapter folder."""
    path = Path(path)
    state = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in state.items()}
    write_safetensors(path / WEIGHTS_NAME, state, metadata=metadata)
    d = config.to_dict()
    d.update(overrides)
    d["peft_type"] = config.peft_type.value
    write_json(path / CONFIG_NAME, d)
    return path


__all__ = ["CONFIG_NAME", "PEFT_PREFIX", "WEIGHTS_NAME", "write_peft_folder"]
