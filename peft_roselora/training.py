"""Driving the RoseLoRA schedule from any training loop, and checkpointing it inside the optimizer's state dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import PeftModel

from . import sharding, zero
from .model import RoseLoraModel


# the key under which the schedule state travels in ``optimizer.state_dict()["param_groups"][0]``
OPTIMIZER_STATE_KEY = "roselora_schedule"


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


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


# ---- the schedule state inside the optimizer's state dict ---------------------------------------------------------
#
# torch.optim.Optimizer.state_dict() keeps every key of a parameter group and load_state_dict() restores the saved
# groups, extra keys included, without casting them (only per-parameter state is cast to the parameters' dtype). So
# a state_dict post-hook that adds the schedule state to the first saved group makes every tool that checkpoints the
# optimizer (Trainer, TRL, accelerate save_state/load_state, torch.save(optimizer.state_dict())) carry it, and it is
# back in optimizer.param_groups[0] after any load_state_dict(), even one that ran before our hooks existed (the
# Trainer loads the optimizer before any callback event). restore_schedule_from_optimizer() takes it from there.


def _add_schedule_state(tuner: RoseLoraModel):
    def hook(_optimizer, state_dict: dict) -> dict:
        if state_dict.get("param_groups"):
            state_dict["param_groups"][0][OPTIMIZER_STATE_KEY] = tuner.schedule_state_dict()
        return state_dict

    return hook


def restore_schedule_from_optimizer(tuner: RoseLoraModel, optimizer) -> bool:
    """Move a schedule state found in ``optimizer.param_groups[0]`` (put there by ``load_state_dict``) into
    ``tuner``.

    Under FSDP2 this is collective: a state that reached only the first process (a full optimizer state dict
    broadcast by ``set_optimizer_state_dict``) is sent to all, and each keeps its rows of the EMAs.

    Returns:
        bool: whether a state was found and restored.

    Raises:
        ScheduleStateError: if the state does not fit the model (see ``RoseLoraModel.load_schedule_state_dict``).
    """
    groups = unwrap_optimizer(optimizer).param_groups
    state = groups[0].pop(OPTIMIZER_STATE_KEY, None) if groups else None
    if tuner.factors_sharded():  # FSDP2: a full state dict may have reached the first process only
        state = sharding.share_from_first_process(state, _active_factor_parameters(tuner), tuner.communication_stats)
    if state is None:
        return False
    tuner.load_schedule_state_dict(state)
    return True


def _active_factor_parameters(tuner: RoseLoraModel) -> list[torch.Tensor]:
    """``lora_A`` / ``lora_B`` weights of the active adapters, as registered (``DTensor`` under FSDP2)."""
    return [
        parameter
        for name in tuner._schedule_adapters(None)
        for _, layer in tuner._rose_layers(name)
        for parameter in layer.factor_parameters(name)
    ]


@dataclass
class ScheduleStateHooksHandle:
    """Handle of the optimizer state-dict hooks that carry the schedule state; ``remove()`` detaches them."""

    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach_schedule_state(model: torch.nn.Module, optimizer) -> ScheduleStateHooksHandle:
    """Make ``optimizer.state_dict()`` carry the RoseLoRA schedule state of ``model`` and ``optimizer.load_state_dict``
    restore it (``register_optimizer_hooks`` and ``RoseLoraCallback`` call this; idempotent per optimizer)."""
    tuner = get_roselora_model(model)
    inner = unwrap_optimizer(optimizer)
    existing = getattr(inner, "_roselora_state_hooks", None)
    if existing is not None and existing[0] is tuner and existing[1].handles:
        return existing[1]

    def after_load(loaded_optimizer) -> None:
        restore_schedule_from_optimizer(tuner, loaded_optimizer)

    handle = ScheduleStateHooksHandle(
        [
            inner.register_state_dict_post_hook(_add_schedule_state(tuner)),
            inner.register_load_state_dict_post_hook(after_load),
        ]
    )
    inner._roselora_state_hooks = (tuner, handle)
    return handle


# ---- optimizer step hooks -----------------------------------------------------------------------------------------


@dataclass
class OptimizerHooksHandle:
    """Handle returned by :func:`register_optimizer_hooks`; ``remove()`` detaches every hook."""

    handles: list
    owner: Optional[object] = None  # the object marked as driven (a torch optimizer or a DeepSpeed ZeRO optimizer)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.owner is not None:
            self.owner.__dict__.pop("_roselora_step_hooks", None)


def register_optimizer_hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerHooksHandle:
    """Make every ``optimizer.step()`` run the RoseLoRA step in the authors' order, and make the optimizer's state
    dict carry the schedule state.

    Before the step: ``update_importance()`` (weights and gradients as the optimizer sees them). After it:
    ``prune_step()``. Works with gradient accumulation (hooks fire once per optimizer step) and with ``accelerate``
    (pass the prepared optimizer). A step that ``GradScaler`` skips runs neither hook. With a DeepSpeed engine pass
    ``engine.optimizer``: DeepSpeed has no step hooks, so the ZeRO optimizer's ``step`` is wrapped instead
    (``peft_roselora.zero.wrap_zero_step``; a step DeepSpeed skips on overflow runs ``skip_step()``).
    ``optimizer.state_dict()`` then holds the schedule state (step, importance EMAs, counters) and
    ``optimizer.load_state_dict()`` restores it, so checkpointing the optimizer (``torch.save``, accelerate
    ``save_state``, DeepSpeed ``save_checkpoint``) is enough to resume exactly.

    Args:
        model (nn.Module): a ``PeftModel`` with RoseLoRA adapters (or its ``RoseLoraModel``).
        optimizer (Optimizer): the optimizer over the adapter parameters.

    Returns:
        OptimizerHooksHandle: call ``.remove()`` to detach.

    Hooks on two optimizers that both step in one iteration would advance the schedule twice: the second
    ``update_importance()`` on the same gradients raises (see ``RoseLoraModel.update_importance``). Hooks on a new
    optimizer for a later training phase are fine.

    Raises:
        RuntimeError: if hooks are already registered on this optimizer, or the optimizer does not update the
            RoseLoRA factors of the active adapters.
    """
    tuner = get_roselora_model(model)
    zero_optimizer = zero.find_zero_optimizer(optimizer)
    inner = zero_optimizer if zero_optimizer is not None else unwrap_optimizer(optimizer)
    if getattr(inner, "_roselora_step_hooks", None) is not None:
        raise RuntimeError(
            "RoseLoRA optimizer hooks are already registered on this optimizer: a second registration would advance "
            "the schedule twice per step. Keep the first one (or call .remove() on its handle before registering "
            "again)."
        )
    if zero_optimizer is not None:
        # DeepSpeed ZeRO: no step hooks, and the wrapped torch optimizer steps once per parameter group
        handle = OptimizerHooksHandle(
            [
                zero.wrap_zero_step(zero_optimizer, tuner.update_importance, tuner.prune_step, tuner.skip_step),
                attach_schedule_state(model, zero_optimizer.optimizer),
            ],
            owner=zero_optimizer,
        )
        zero_optimizer._roselora_step_hooks = handle
        return handle
    optimized = {id(p) for group in inner.param_groups for p in group["params"]}
    factors = _active_factor_parameters(tuner)
    if factors and not any(id(weight) in optimized for weight in factors):
        raise RuntimeError(
            "register_optimizer_hooks: the optimizer does not update the RoseLoRA factors of the active adapters; "
            "register the hooks on the optimizer that steps lora_A / lora_B."
        )

    def before_step(_optimizer, _args, _kwargs):
        tuner.update_importance()

    def after_step(_optimizer, _args, _kwargs):
        tuner.prune_step()

    handle = OptimizerHooksHandle(
        [
            inner.register_step_pre_hook(before_step),
            inner.register_step_post_hook(after_step),
            attach_schedule_state(model, inner),
        ],
        owner=inner,
    )
    inner._roselora_step_hooks = handle
    return handle
