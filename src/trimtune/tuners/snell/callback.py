"""The SNELLA allocator as a Hugging Face ``TrainerCallback`` (for ``transformers.Trainer``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import TrimtuneError
from .config import SnellaConfig


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class SnellaTrainerCallback(_trainer_callback_base()):
    """The SNELLA allocator as a Hugging Face ``TrainerCallback``.

        cb = SnellaTrainerCallback(pm.peft_config["default"])
        trainer = Trainer(model=pm, ..., callbacks=[cb])

    Importance scores are folded in after each optimizer step (gradients still present) and
    the budget reallocated on the allocator's schedule; the schedule length is the Trainer's
    ``max_steps``.
    """

    def __init__(self, config: SnellaConfig, model: nn.Module | None = None) -> None:
        from .allocator import SnellaAllocator

        if not isinstance(config, SnellaConfig):
            raise TrimtuneError(f"SnellaTrainerCallback needs a SnellaConfig, got "
                                f"{type(config).__name__}: SNELL has no allocator")
        self.allocator = SnellaAllocator(model, config)

    class _State:
        def __init__(self, model: nn.Module, hf_state: Any, step: int) -> None:
            self.model = model
            self.step = step
            self.total_steps = int(hf_state.max_steps)
            epochs = max(1, int(getattr(hf_state, "num_train_epochs", 1) or 1))
            self.steps_per_epoch = max(1, -(-self.total_steps // epochs))
            self.epoch = int(hf_state.epoch or 0)

    def _call(self, hook: str, state: Any, model: nn.Module | None, step: int) -> None:
        fn = getattr(self.allocator, hook, None)
        if fn is not None:
            fn(self._State(model if model is not None else self.allocator.model, state, step))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._call("on_train_start", state, model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._call("on_step_start", state, model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # HF calls this after optimizer.step(), before zero_grad and before global_step += 1
        self._call("after_optimizer_step", state, model, state.global_step + 1)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._call("on_epoch_end", state, model, state.global_step)


__all__ = ["SnellaTrainerCallback"]
