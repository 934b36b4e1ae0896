"""RoseLoRA factors under DeepSpeed ZeRO (stages 1, 2 and 3): whole factors and gradients through DeepSpeed's public
``deepspeed.utils.safe_*`` helpers, and the one place where the schedule is attached to a ZeRO optimizer's step.

Under ZeRO the optimizer updates fp32 master partitions, not the model's parameters, and the gradients live in
DeepSpeed's partitioned buffers (``param.grad`` is ``None``). So, per factor:

- the importance reads the whole fp32 weight (``safe_get_full_fp32_param``) and the whole, reduced gradient
  (``safe_get_full_grad``); both are collective, the same on every process, so every process computes the
  one-process importance and masks (no agreement needed);
- persistent mode writes the masked gradient back (``safe_set_full_grad``);
- the prune writes the masked, clamped fp32 master back (``safe_set_full_fp32_param``: this process's partition of
  it), which is what the optimizer keeps updating; the model's own copy is masked too: in place for ZeRO-1/2, whose
  parameters are whole on every process, and in every forward for ZeRO-3, whose parameters are gathered for the
  forward only (``RoseLoraLayer.ensure_masked``).

DeepSpeed runs ``engine.step()`` inside ``accelerator.backward()`` under the Trainer and offers no optimizer-step
hooks, and the ZeRO optimizer calls the wrapped torch optimizer once per parameter group (ZeRO-3: per sub-group),
so neither the Trainer's optimizer events nor torch's step hooks see one step with its gradients.
:func:`wrap_zero_step` therefore wraps the ZeRO optimizer object's ``step`` (an instance attribute, restorable) —
the schedule's importance before it, the prune after it, or ``skip`` when DeepSpeed skipped the step on overflow.
This is the only place the package replaces a library's method.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def is_zero_parameter(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO manages ``parameter`` (stage 3: ``ds_id``; stages 1 and 2: ``_hp_mapping``)."""
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def is_zero_stage3(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` is partitioned by ZeRO-3 (empty outside the forward and backward passes)."""
    return hasattr(parameter, "ds_id")


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The shape of a parameter, also of a ZeRO-3 one outside the forward pass (``ds_shape``)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def full_weight(parameter: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master weight of a ZeRO parameter (a copy; collective).

    Raises:
        RuntimeError: if DeepSpeed returns none (the parameter is not trained by the ZeRO optimizer).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    return _checked(safe_get_full_fp32_param(parameter), "fp32 weight")


def full_gradient(parameter: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole, reduced gradient of a ZeRO parameter, or None before any backward (collective)."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(parameter)


def set_full_weight(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into this process's partition of the fp32 master weight (and, for ZeRO-1/2, whose parameters
    are whole on every process, into the model's parameter too)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(parameter, value)
    if not is_zero_stage3(parameter):
        with torch.no_grad():
            parameter.copy_(value.to(parameter.dtype))


def set_full_gradient(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into the partitioned gradient of a ZeRO parameter."""
    from deepspeed.utils import safe_set_full_grad

    safe_set_full_grad(parameter, value)


def _checked(value: Optional[torch.Tensor], what: str) -> torch.Tensor:
    if value is None:
        raise RuntimeError(f"DeepSpeed returned no {what} for a RoseLoRA factor: is it trained by the ZeRO optimizer?")
    return value


def find_zero_optimizer(optimizer) -> Optional[object]:
    """The DeepSpeed ZeRO optimizer inside ``optimizer`` (accelerate's wrappers, the engine's ``optimizer``), or
    None. Never imports DeepSpeed: a process that has not imported it has no ZeRO optimizer."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, ZeROOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


@dataclass
class ZeroStepHandle:
    """Handle of :func:`wrap_zero_step`; ``remove()`` restores the optimizer's own ``step``."""

    zero_optimizer: object

    def remove(self) -> None:
        self.zero_optimizer.__dict__.pop("step", None)


def wrap_zero_step(
    zero_optimizer, before: Callable[[], None], after: Callable[[], None], skipped: Callable[[], None]
) -> ZeroStepHandle:
    """Make every ``zero_optimizer.step()`` call ``before()`` first and ``after()`` once it has applied the update, or
    ``skipped()`` when DeepSpeed skipped it (``overflow``: fp16 loss scaling, or a non-finite gradient norm).
    ``register_optimizer_hooks`` calls it, and refuses a second registration.
    """
    original = zero_optimizer.step  # the bound method of the class

    def step(*args, **kwargs):
        before()
        result = original(*args, **kwargs)
        if getattr(zero_optimizer, "overflow", False):
            skipped()
        else:
            after()
        return result

    zero_optimizer.step = step
    return ZeroStepHandle(zero_optimizer)
