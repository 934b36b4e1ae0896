"""Driving the RoseLoRA schedule from any training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel

from .model import RoseLoraModel


def get_roselora_model(model: torch.nn.Module) -> RoseLoraModel:
    """The ``RoseLoraModel`` inside ``model`` (a ``PeftModel`` or the tuner model itself).

    Raises:
        TypeError: if ``model`` holds no RoseLoRA tuner.
    """
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, RoseLoraModel):
        raise TypeError(
            f"Expected a PeftModel wrapping a RoseLoraModel (get_peft_model(model, RoseLoraConfig(...))), got "
            f"{type(model).__name__} with tuner {type(tuner).__name__}."
        )
    return tuner


@dataclass
class OptimizerHooksHandle:
    """Handle returned by :func:`register_optimizer_hooks`; ``remove()`` detaches both hooks."""

    pre_hook: torch.utils.hooks.RemovableHandle
    post_hook: torch.utils.hooks.RemovableHandle

    def remove(self) -> None:
        self.pre_hook.remove()
        self.post_hook.remove()


def register_optimizer_hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerHooksHandle:
    """Make every ``optimizer.step()`` run the RoseLoRA step in the authors' order.

    Before the step: ``update_importance()`` (weights and gradients as the optimizer sees them). After it:
    ``prune_step()``. Works with gradient accumulation (hooks fire once per optimizer step) and with ``accelerate``
    (pass the prepared optimizer). A step that ``GradScaler`` skips runs neither hook.

    Args:
        model (nn.Module): a ``PeftModel`` with RoseLoRA adapters (or its ``RoseLoraModel``).
        optimizer (Optimizer): the optimizer over the adapter parameters.

    Returns:
        OptimizerHooksHandle: call ``.remove()`` to detach.
    """
    tuner = get_roselora_model(model)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one

    def before_step(_optimizer, _args, _kwargs):
        tuner.update_importance()

    def after_step(_optimizer, _args, _kwargs):
        tuner.prune_step()

    return OptimizerHooksHandle(
        pre_hook=optimizer.register_step_pre_hook(before_step),
        post_hook=optimizer.register_step_post_hook(after_step),
    )
