"""The one training loop, serving distillation and fine-tuning: see :func:`fit`."""

from .checkpointing import load_checkpoint, save_checkpoint
from .config import TrainConfig, TrainResult, TrainState
from .loop import fit
from .sampler import EpochSampler

__all__ = ["EpochSampler", "TrainConfig", "TrainResult", "TrainState", "fit", "load_checkpoint",
           "save_checkpoint"]
