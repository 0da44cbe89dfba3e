"""The one training loop, serving distillation and fine-tuning: see :func:`fit`."""

from .callbacks import BestEpoch, CollapseWatch, LossWatch, trainable_state
from .checkpointing import load_checkpoint, save_checkpoint
from .config import TrainConfig, TrainResult, TrainState
from .loop import fit
from .objectives import ClassificationObjective
from .sampler import EpochSampler

__all__ = ["BestEpoch", "ClassificationObjective", "CollapseWatch", "EpochSampler", "LossWatch",
           "TrainConfig", "TrainResult", "TrainState", "fit", "load_checkpoint",
           "save_checkpoint", "trainable_state"]
