"""``RoseLoraCallback``: drives the RoseLoRA schedule inside ``transformers.Trainer`` and TRL trainers."""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import zero
from .model import RoseLoraModel
from .training import (
    attach_schedule_state,
    get_roselora_model,
    register_optimizer_hooks,
    restore_schedule_from_optimizer,
    unwrap_optimizer,
)


# the schedule state file of 0.1.0 checkpoints (now the state travels in the optimizer's state dict)
LEGACY_STATE_FILE = "roselora_state.safetensors"
LOG_KEYS = (
    "roselora_keep_ratio",
    "roselora_factor_density",
    "roselora_skipped_steps",
    "roselora_nonfinite_steps",
)


class UnsupportedSetupError(RuntimeError):
    """Raised at train begin for a distributed setup whose gradients or shards the schedule cannot see."""


class RoseLoraCallback(TrainerCallback):
    """Runs the RoseLoRA step in every optimizer step of a ``Trainer`` (also TRL's ``SFTTrainer``).

    - ``on_train_begin``: resolves ``total_step`` from the Trainer's ``max_steps`` if the config leaves it unset
      (``prune_start_step`` / ``prune_end_step`` given as fractions resolve against it: defaults 10 % and 80 %),
      makes the optimizer's state dict carry the schedule state (so every Trainer checkpoint holds it), restores it
      when the run resumes (the Trainer has loaded the optimizer by then), and refuses FSDP1 (FSDP2 is supported:
      the importance EMAs stay sharded like the factors, see ``peft_roselora.sharding``). Under DeepSpeed, whose
      engine steps inside ``backward()``, it attaches the schedule to the engine's optimizer instead (ZeRO: see
      ``peft_roselora.zero``) and the two optimizer events below only check the step count.
    - ``on_pre_optimizer_step`` (gradients present, accumulated and clipped): ``update_importance()``, on unscaled
      gradients under fp16 mixed precision.
    - ``on_optimizer_step``: ``prune_step()``, once per optimizer step, also with gradient accumulation; a step the
      GradScaler skipped (overflow) runs no prune and is counted instead (``skip_step()``).
    - ``on_log``: adds ``roselora_keep_ratio``, ``roselora_factor_density``, ``roselora_skipped_steps`` and
      ``roselora_nonfinite_steps`` to every training log.

    Args:
        resume_from_checkpoint (str | None): only for checkpoints written by peft-roselora 0.1.0 outside
            ``output_dir`` (their schedule state is a ``roselora_state.safetensors`` file, not in the optimizer):
            the folder to read it from.

    Raises:
        UnsupportedSetupError: at train begin under FSDP1.
        RuntimeError: in the first optimizer step if the adapter has no gradients (e.g. frozen by mistake), or when
            the schedule and the Trainer disagree on the step (the schedule is driven twice).
    """

    def __init__(self, resume_from_checkpoint: Optional[str] = None) -> None:
        self.optimizer_steps = 0  # optimizer steps this callback drove in this process (for tests and sanity)
        self.resume_from_checkpoint = resume_from_checkpoint
        self._engine_hooks = None  # under DeepSpeed: the schedule attached to the engine's optimizer

    @classmethod
    def attach(cls, trainer, **kwargs) -> RoseLoraCallback:
        """Add a ``RoseLoraCallback`` to ``trainer`` as its *first* callback, so that the reporting integrations
        (TensorBoard, W&B, ...) see the RoseLoRA metrics.

        transformers runs the reporting integrations before callbacks passed with ``callbacks=[...]`` and
        ``Trainer.log`` offers no hook before them, so metrics added in ``on_log`` by a later callback reach the
        console, ``state.log_history`` and later callbacks only. This uses the public ``trainer.callback_handler``
        list; any ``RoseLoraCallback`` already there is replaced.
        """
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [callback for callback in callbacks if not isinstance(callback, RoseLoraCallback)]
        callback = cls(**kwargs)
        callbacks.insert(0, callback)
        return callback

    # ---- train begin -------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **_
    ) -> None:
        _refuse_unsupported_setups(args, model)
        tuner = get_roselora_model(model)
        for name in tuner.active_adapters:
            config = tuner.peft_config[name]
            if config.total_step is None:
                tuner.set_total_step(state.max_steps, name)
            _, end, _ = config.resolve_schedule()
            if end > state.max_steps:
                warnings.warn(
                    f"RoseLoRA adapter '{name}' reaches its final keep ratio at step {end}, after the Trainer's last "
                    f"step {state.max_steps}: training ends before the target sparsity is reached.",
                    stacklevel=2,
                )
        if optimizer is None:
            raise UnsupportedSetupError("RoseLoraCallback received no optimizer at train begin.")
        self._engine_hooks = None
        if _deepspeed_enabled(args):
            # DeepSpeed steps inside accelerator.backward(): the Trainer's optimizer events come after the step, so the
            # schedule is attached to the engine's optimizer itself (ZeRO: its step wrapped; otherwise step hooks)
            self._engine_hooks = register_optimizer_hooks(model, optimizer)
            state_owner = zero.find_zero_optimizer(optimizer)
            state_owner = state_owner.optimizer if state_owner is not None else optimizer
        else:
            attach_schedule_state(model, optimizer)
            state_owner = optimizer
        restored = restore_schedule_from_optimizer(tuner, state_owner)
        if state.global_step > 0:
            if not restored:
                self._restore_legacy(tuner, args, state)
            for name in tuner.active_adapters:
                schedule = tuner.adapter_schedule(name)
                if schedule.step + schedule.skipped_steps != state.global_step:
                    raise RuntimeError(
                        f"RoseLoRA schedule of adapter '{name}' resumes at step {schedule.step} with "
                        f"{schedule.skipped_steps} skipped steps, but the Trainer resumes at step "
                        f"{state.global_step}: "
                        "the checkpoint's optimizer state and trainer state do not belong together."
                    )

    def _restore_legacy(self, tuner: RoseLoraModel, args, state: TrainerState) -> None:
        candidates = [
            self.resume_from_checkpoint,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
        ]
        candidates = [c for c in candidates if c]
        for folder in candidates:
            path = os.path.join(folder, LEGACY_STATE_FILE)
            if os.path.isfile(path):
                tuner.load_roselora_state_dict(load_file(path))
                return
        raise RuntimeError(
            f"Resuming at step {state.global_step}, but the optimizer state holds no RoseLoRA schedule state and no "
            f"0.1.0 {LEGACY_STATE_FILE} was found in {candidates}: the checkpoint was not written with "
            "RoseLoraCallback, so the RoseLoRA schedule cannot resume exactly. For a 0.1.0 checkpoint outside "
            "output_dir pass RoseLoraCallback(resume_from_checkpoint=PATH)."
        )

    # ---- the step ----------------------------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if self._engine_hooks is not None:  # DeepSpeed: driven from the engine's optimizer step
            return
        self._loss_scale_before = _unscale_gradients(optimizer)
        get_roselora_model(model).update_importance()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        tuner = get_roselora_model(model)
        # global_step is the 0-based index of this step; under DeepSpeed the engine has already run it
        expected_step = state.global_step + (1 if self._engine_hooks is not None else 0)
        for name in tuner.active_adapters:
            schedule = tuner.adapter_schedule(name)
            if schedule.step + schedule.skipped_steps != expected_step:
                raise RuntimeError(
                    f"RoseLoRA schedule of adapter '{name}' is at step {schedule.step} (+{schedule.skipped_steps} "
                    f"skipped) but the Trainer is at optimizer step {state.global_step}: is the schedule also driven "
                    "elsewhere (optimizer hooks)?"
                )
        if self._engine_hooks is not None:
            self.optimizer_steps += 1
            return
        if _step_was_skipped(optimizer, getattr(self, "_loss_scale_before", None)):
            tuner.skip_step()
        else:
            tuner.prune_step()
        self.optimizer_steps += 1

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if getattr(self, "_engine_hooks", None) is not None:
            self._engine_hooks.remove()
            self._engine_hooks = None

    # ---- logs --------------------------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, model=None, **kwargs) -> None:
        # Trainer.log() has no hook before the callbacks run and appends a copy of `logs` to state.log_history just
        # before on_log: update both. Callbacks before this one (the reporting integrations, unless
        # RoseLoraCallback.attach(trainer) put this one first) have already seen `logs`.
        if logs is None or model is None or not any(key in logs for key in ("loss", "train_loss", "eval_loss")):
            return
        metrics = _metrics(get_roselora_model(model))
        logs.update(metrics)
        if state.log_history:  # the entry Trainer.log() appended for these logs
            state.log_history[-1].update(metrics)


def _metrics(tuner: RoseLoraModel) -> dict[str, float]:
    name = tuner.active_adapters[0]
    schedule = tuner.adapter_schedule(name)
    return {
        "roselora_keep_ratio": tuner.current_keep_ratio(name),
        "roselora_factor_density": tuner.factor_density(),
        "roselora_skipped_steps": schedule.skipped_steps,
        "roselora_nonfinite_steps": schedule.nonfinite_steps,
    }


def _unscale_gradients(optimizer) -> Optional[float]:
    """Under fp16 mixed precision the gradients are still multiplied by the loss scale in ``on_pre_optimizer_step``
    unless the Trainer clipped them (``max_grad_norm``): unscale them first, through the GradScaler's public
    ``unscale_``, which ``scaler.step`` then honours (it unscales each optimizer once per step).

    Returns:
        float | None: the loss scale before the step, or None without an enabled GradScaler.
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    try:
        scaler.unscale_(unwrap_optimizer(optimizer))
    except RuntimeError as error:  # already unscaled this step (gradient clipping did it)
        if "unscale_() has already been called" not in str(error):
            raise
    return scaler.get_scale()


def _step_was_skipped(optimizer, loss_scale_before: Optional[float]) -> bool:
    """Whether the GradScaler skipped the optimizer step that just ran. ``GradScaler.update()`` lowers the scale
    exactly when it found inf/NaN gradients and skipped the step; accelerate's ``step_was_skipped`` is also honoured
    (with accelerate 1.15 and the Trainer it stays False for skipped steps on CPU, so the scale is the signal)."""
    if getattr(optimizer, "step_was_skipped", False):
        return True
    scaler = getattr(optimizer, "scaler", None)
    return loss_scale_before is not None and scaler is not None and scaler.get_scale() < loss_scale_before


def _deepspeed_enabled(args: TrainingArguments) -> bool:
    return bool(getattr(args, "deepspeed", None)) or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    )


def _refuse_unsupported_setups(args: TrainingArguments, model) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    # the FSDP version: the training arguments' (transformers defaults to 2), else the launcher's (accelerate: 1)
    fsdp_version = None
    if getattr(args, "fsdp", None):
        fsdp_version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_version = int(os.environ.get("FSDP_VERSION", "1"))
    if isinstance(model, FullyShardedDataParallel) or fsdp_version == 1:
        raise UnsupportedSetupError(
            "RoseLoRA does not support FSDP1 (FullyShardedDataParallel): it flattens lora_A / lora_B into shards that "
            "cut across their rows and columns, so the per-row and per-column top-k cannot be taken. Use FSDP2: "
            "fsdp_config={'version': 2} in TrainingArguments (the default), `fsdp_version: 2` in the accelerate "
            "config, or torch.distributed.fsdp.fully_shard in a custom loop; see docs/training.md."
        )
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedSetupError(f"RoseLoraCallback received no model (got {type(model).__name__}).")
