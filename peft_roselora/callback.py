"""``RoseLoraCallback``: drives the RoseLoRA schedule inside ``transformers.Trainer`` and TRL trainers."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .model import RoseLoraModel
from .training import get_roselora_model


STATE_FILE = "roselora_state.safetensors"
LOG_KEYS = ("roselora_keep_ratio", "roselora_factor_density")


class UnsupportedSetupError(RuntimeError):
    """Raised at train begin for a distributed setup whose gradients or shards the schedule cannot see."""


class RoseLoraCallback(TrainerCallback):
    """Runs the RoseLoRA step in every optimizer step of a ``Trainer`` (also TRL's ``SFTTrainer``).

    - ``on_train_begin``: resolves ``total_step`` from the Trainer's ``max_steps`` if the config leaves it unset
      (``prune_start_step`` / ``prune_end_step`` given as fractions resolve against it: defaults 10 % and 80 %),
      restores the schedule state when the run resumes from a checkpoint, and refuses FSDP and DeepSpeed.
    - ``on_pre_optimizer_step`` (gradients present, accumulated and clipped): ``update_importance()``.
    - ``on_optimizer_step``: ``prune_step()``; once per optimizer step, also with gradient accumulation.
    - ``on_save``: writes ``roselora_state.safetensors`` (step and importance EMAs) into the checkpoint folder; the
      adapter file in the checkpoint stays a normal PEFT adapter.
    - logging: adds ``roselora_keep_ratio`` and ``roselora_factor_density`` to every Trainer log, so they reach
      the console, ``state.log_history``, TensorBoard, W&B, ... like ``loss``.

    Raises:
        UnsupportedSetupError: at train begin under FSDP or DeepSpeed.
        RuntimeError: in the first optimizer step if the adapter has no gradients (e.g. frozen by mistake).
    """

    def __init__(self) -> None:
        self.optimizer_steps = 0  # optimizer steps this callback drove in this process (for tests and sanity)

    # ---- train begin -------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
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
        trainer, resume_from = _find_trainer()
        if state.global_step > 0:
            self._restore(tuner, args, state, resume_from)
        if trainer is not None:
            _add_metrics_to_trainer_logs(trainer, tuner)
        else:  # unusual call path: the metrics still reach on_log of later callbacks and state.log_history
            self._log_in_on_log = True

    def _restore(self, tuner: RoseLoraModel, args, state: TrainerState, resume_from: Optional[str]) -> None:
        candidates = [resume_from, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        for folder in candidates:
            if folder and os.path.isfile(os.path.join(folder, STATE_FILE)):
                tuner.load_roselora_state_dict(load_file(os.path.join(folder, STATE_FILE)))
                steps = {name: tuner.schedule_step(name) for name in tuner.active_adapters}
                if any(step != state.global_step for step in steps.values()):
                    raise RuntimeError(
                        f"RoseLoRA state in {folder} is at steps {steps}, the Trainer resumes at step "
                        f"{state.global_step}."
                    )
                return
        raise RuntimeError(
            f"Resuming at step {state.global_step}, but no {STATE_FILE} was found in {[c for c in candidates if c]}: "
            "the checkpoint was not written with RoseLoraCallback, so the RoseLoRA schedule cannot resume exactly."
        )

    # ---- the step ----------------------------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        get_roselora_model(model).update_importance()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        tuner = get_roselora_model(model)
        expected = state.global_step  # 0-based index of this optimizer step
        for name in tuner.active_adapters:
            if tuner.schedule_step(name) != expected:
                raise RuntimeError(
                    f"RoseLoRA schedule of adapter '{name}' is at step {tuner.schedule_step(name)} but the Trainer is "
                    f"at optimizer step {expected}: is the schedule also driven elsewhere (optimizer hooks)?"
                )
        tuner.prune_step()
        self.optimizer_steps += 1

    # ---- checkpoints and logs ----------------------------------------------------------------------------------

    def on_save(self, args, state, control, model=None, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_file(get_roselora_model(model).roselora_state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs) -> None:
        if getattr(self, "_log_in_on_log", False) and logs is not None and model is not None:
            logs.update(_metrics(get_roselora_model(model)))


def _metrics(tuner: RoseLoraModel) -> dict[str, float]:
    name = tuner.active_adapters[0]
    return {"roselora_keep_ratio": tuner.current_keep_ratio(name), "roselora_factor_density": tuner.factor_density()}


def _add_metrics_to_trainer_logs(trainer, tuner: RoseLoraModel) -> None:
    """Wrap ``trainer.log`` once so that every log carries the RoseLoRA metrics before any callback sees it
    (transformers runs the reporting integrations before user callbacks)."""
    if getattr(trainer.log, "_roselora_wrapped", False):
        return
    original = trainer.log

    def log(logs: dict[str, float], *args, **kwargs):
        if any(key in logs for key in ("loss", "train_loss", "eval_loss")) or not logs:
            logs = {**logs, **_metrics(tuner)}
        return original(logs, *args, **kwargs)

    log._roselora_wrapped = True
    trainer.log = log


def _find_trainer():
    """The ``Trainer`` whose training loop called this callback, and its ``resume_from_checkpoint`` argument."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and "resume_from_checkpoint" in frame.f_locals:
            resume_from = frame.f_locals["resume_from_checkpoint"]
            return owner, resume_from if isinstance(resume_from, str) else None
        frame = frame.f_back
    return None, None


def _refuse_unsupported_setups(args: TrainingArguments, model) -> None:
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UnsupportedSetupError(
            "RoseLoRA does not support DeepSpeed: under accelerate the optimizer step runs inside backward(), so the "
            "callback sees no gradients and the sparsity schedule cannot run. Use DDP (torchrun / accelerate launch "
            "--multi_gpu); see docs/training.md."
        )
    fsdp_on = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    from torch.distributed.fsdp import FullyShardedDataParallel

    if fsdp_on or isinstance(model, FullyShardedDataParallel):
        raise UnsupportedSetupError(
            "RoseLoRA does not support FSDP: lora_A / lora_B are sharded by rows, and the per-column top-k of lora_B "
            "needs the whole column. Use DDP (torchrun / accelerate launch --multi_gpu); see docs/training.md."
        )
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedSetupError(f"RoseLoraCallback received no model (got {type(model).__name__}).")
