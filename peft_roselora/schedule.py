"""The schedule state of one RoseLoRA adapter (``AdapterSchedule``) and the pure decisions of each training step.

``AdapterSchedule`` is the one owner of everything the schedule remembers between optimizer steps: the step ``t``,
whether the importance of the current step has been taken, the keep ratio of the last mask selection, the
importance EMAs of every factor, and the fault counters (steps the GradScaler skipped, steps whose gradients were
not finite). It has ``state_dict()`` / ``load_state_dict()``; ``RoseLoraModel`` holds one per adapter and calls it,
the layers hold factors and masks only. The decisions (when to re-select masks, when to clamp, when the importance is
still needed, how pruned entries score in persistent mode) are small pure functions, unit-tested alone
(``tests/test_schedule.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import sparsity


STATE_FORMAT_VERSION = 2
# the configuration fields a checkpoint's schedule was computed with; resuming with different values is refused
SCHEDULE_FIELDS = ("keep_ratio", "prune_start_step", "prune_end_step", "total_step", "prune_interval", "prune_mode")
# score given to pruned entries in persistent mode: importances are >= 0, so they are never selected again
PRUNED_SCORE = -1.0


class ScheduleStateError(ValueError):
    """A schedule state that cannot be restored into this model (wrong key, shape, version or configuration)."""


# ---- pure decisions -------------------------------------------------------------------------------------------------


def should_recompute_masks(
    step: int,
    keep_ratio: float,
    prune_start_step: int,
    prune_end_step: int,
    prune_interval: int,
    persistent: bool,
    last_keep_ratio: Optional[float],
) -> bool:
    """Whether the prune at step ``t = step`` selects new masks.

    Masks are re-selected when ``tau(t) < 1`` and ``t`` is on the ``prune_interval`` grid counted from ``t_i``, and
    always at ``t_f`` (so the final keep ratio is reached even when ``t_f`` is off the grid). In persistent mode a
    selection at an unchanged keep ratio is skipped: the top-k among the kept entries with the same count selects
    them all again.
    """
    if keep_ratio >= 1.0:
        return False
    if (step - prune_start_step) % prune_interval != 0 and step != prune_end_step:
        return False
    return not (persistent and last_keep_ratio == keep_ratio)


def clamp_bound(step: int, prune_start_step: int, clamp_value: Optional[float]) -> Optional[float]:
    """The clamp bound at step ``t``: ``clamp_value`` once pruning has started (``t > t_i``), else ``None``."""
    return clamp_value if clamp_value is not None and step > prune_start_step else None


def importance_still_used(persistent: bool, last_keep_ratio: Optional[float], final_keep_ratio: float) -> bool:
    """False once persistent-mode masks are final: they never change again, so the importance is not needed."""
    return not (persistent and last_keep_ratio == final_keep_ratio)


def should_mask_gradients(persistent: bool, masks_keep_all: list[bool]) -> bool:
    """Whether the gradients of pruned entries are zeroed before the optimizer step: in persistent mode, once some
    mask prunes anything (masking with all-True masks is a no-op)."""
    return persistent and not all(masks_keep_all)


def selection_scores(importance: torch.Tensor, mask: torch.Tensor, persistent: bool) -> torch.Tensor:
    """Scores the top-k selects from: the importance, with pruned entries at -1 in persistent mode.

    Args:
        importance (Tensor): EMA (float32 or bfloat16), any shape.
        mask (Tensor): bool mask of the same shape (True = kept).
        persistent (bool): whether pruned entries must stay pruned.

    Returns:
        Tensor: ``importance`` (the same tensor) or a copy with ``-1`` where ``mask`` is False.
    """
    return importance.masked_fill(~mask, PRUNED_SCORE) if persistent else importance


def replay_last_keep_ratio(config, step: int) -> Optional[float]:
    """The keep ratio of the last mask selection at or before ``step``, found by replaying the decisions of
    :func:`should_recompute_masks` from step 1 (used to convert 0.1.0 checkpoints, which did not record it).

    Raises:
        ValueError: if the configuration's ``total_step`` is not set.
    """
    start, end, _ = config.resolve_schedule()
    persistent = config.prune_mode == "persistent"
    last = None
    for past in range(1, step + 1):
        ratio = sparsity.keep_ratio_at(past, config.keep_ratio, start, end)
        if should_recompute_masks(past, ratio, start, end, config.prune_interval, persistent, last):
            last = ratio
    return last


@dataclass(frozen=True)
class StepPlan:
    """What the prune after optimizer step ``step`` does."""

    step: int
    keep_ratio: float
    recompute_masks: bool
    clamp_value: Optional[float]
    importance_was_finite: bool
    # the step's factors and gradients were checked finite before the optimizer step: a finite step of the optimizer
    # keeps them finite (barring overflow, which the next step's check names), so the prune need not check again
    inputs_checked_finite: bool = False


# ---- the state owner ------------------------------------------------------------------------------------------------


class AdapterSchedule:
    """Schedule state of one adapter, and the transitions of a training step.

    One optimizer step is ``record_importance`` (before ``optimizer.step()``), then ``advance`` (after it), or
    ``skip`` when the optimizer did not apply the step (GradScaler overflow). The configuration (keep ratio, schedule
    steps, mode) is read from the adapter's ``RoseLoraConfig`` each time, so ``set_total_step`` takes effect at once.

    Attributes:
        step (int): optimizer steps applied so far (``t``).
        importance_pending (bool): the importance of the current step was recorded and the prune has not run yet.
        last_keep_ratio (float | None): the keep ratio of the last mask selection.
        skipped_steps (int): optimizer steps skipped (GradScaler overflow): neither importance nor prune ran.
        nonfinite_steps (int): steps whose gradients held NaN/inf: the importance EMA kept its previous value.
        importance_A / importance_B (dict[str, Tensor]): EMAs per module name (in ``config.importance_dtype``),
            shapes ``(r, in)``, ``(out, r)``.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.step = 0
        self.importance_pending = False
        self.pending_nonfinite = False
        self.pending_checked_finite = False  # transient, like the gradient guard below: not state
        self.last_keep_ratio: Optional[float] = None
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.importance_A: dict[str, torch.Tensor] = {}
        self.importance_B: dict[str, torch.Tensor] = {}
        # transient guard, not state: the gradient tensor (and its version) the last importance update read
        self._last_gradient: Optional[tuple[torch.Tensor, int]] = None

    # -- the configuration, resolved --

    @property
    def persistent(self) -> bool:
        return self.config.prune_mode == "persistent"

    def keep_ratio_at(self, step: Optional[int] = None) -> float:
        """``tau(step)`` (default: the current step).

        Raises:
            ValueError: if the configuration's ``total_step`` is not set.
        """
        start, end, _ = self.config.resolve_schedule()
        return sparsity.keep_ratio_at(self.step if step is None else step, self.config.keep_ratio, start, end)

    def importance_needed(self) -> bool:
        return importance_still_used(self.persistent, self.last_keep_ratio, self.config.keep_ratio)

    # -- transitions --

    def check_new_gradients(self, gradient: torch.Tensor) -> None:
        """Refuse a second schedule step on the gradients of the same backward pass (two optimizers with hooks that
        both step in one iteration): ``gradient`` is one factor's ``.grad``; a new backward creates a new tensor
        (``zero_grad(set_to_none=True)``) or bumps its version counter (accumulation into zeroed gradients).

        Raises:
            RuntimeError: if ``gradient`` is the tensor :meth:`remember_gradient` saw last, unchanged since.
        """
        if self._last_gradient is not None:
            previous, version = self._last_gradient
            if previous is gradient and gradient._version == version:
                raise RuntimeError(
                    "RoseLoRA schedule driven twice on the same gradients (no backward pass since the previous "
                    "optimizer step): optimizer hooks on two optimizers that both step each iteration advance the "
                    "schedule twice. Register the hooks on one optimizer only (the one that steps lora_A / lora_B)."
                )

    def remember_gradient(self, gradient: torch.Tensor) -> None:
        """Note the gradient tensor this step's importance update used, after any in-place masking of it."""
        self._last_gradient = (gradient, gradient._version)

    def record_importance(
        self,
        module_names: list[str],
        weights: list[torch.Tensor],
        grads: list[torch.Tensor],
        agree: Optional[Callable[[bool], bool]] = None,
        repair: Optional[Callable[[], bool]] = None,
    ) -> bool:
        """Fold ``|w * g|`` of this step into the EMAs, unless a gradient or weight is not finite.

        Args:
            module_names (list[str]): one name per module; ``weights`` / ``grads`` hold ``[A, B]`` per module.
            weights (list[Tensor]): the factors (``2 * len(module_names)`` of them), or the rows of them this process
                holds under FSDP2 (the EMAs then hold the same rows).
            grads (list[Tensor]): their gradients (the same rows).
            agree (callable | None): combines the finiteness flag over processes (FSDP2), see
                ``sparsity.update_importance_emas``.
            repair (callable | None): fixes the gradients when a value is not finite, see
                ``sparsity.update_importance_emas``.

        Returns:
            bool: whether the values were finite and the EMAs were updated (a non-finite step leaves every EMA as it
            was and is counted in ``nonfinite_steps`` when the prune runs).

        Raises:
            RuntimeError: if the importance of this step was already recorded (two optimizers with hooks, or two
                calls without a prune in between).
        """
        self._check_not_pending("update_importance()")
        previous = []
        for index, name in enumerate(module_names):
            for store, weight in (
                (self.importance_A, weights[2 * index]),
                (self.importance_B, weights[2 * index + 1]),
            ):
                ema = store.get(name)
                if ema is not None and ema.device != weight.device:  # the model moved (model.to(device))
                    store[name] = ema = ema.to(weight.device)
                previous.append(ema)
        updated = sparsity.update_importance_emas(
            previous, weights, grads, self.config.importance_beta, agree, dtype=self.importance_dtype, repair=repair
        )
        finite = updated is not None
        if finite:
            for index, name in enumerate(module_names):
                self.importance_A[name], self.importance_B[name] = updated[2 * index], updated[2 * index + 1]
        self.importance_pending = True
        self.pending_nonfinite = not finite
        self.pending_checked_finite = finite
        return finite

    def mark_importance_not_needed(self, gradients_finite: bool = False) -> None:
        """The step's importance is deliberately not computed (persistent masks are final): the EMAs are released,
        since no later step reads them (one fp32 copy of the adapter less for the rest of training).
        ``gradients_finite``: the (masked) gradients were checked finite, so the prune need not check the factors."""
        self._check_not_pending("update_importance()")
        self.importance_pending = True
        self.pending_nonfinite = False
        self.pending_checked_finite = gradients_finite
        self.importance_A, self.importance_B = {}, {}

    def advance(self) -> StepPlan:
        """Count the applied optimizer step (``t += 1``) and decide what its prune does.

        Raises:
            RuntimeError: if no importance was recorded since the previous step.
            ValueError: if ``total_step`` is not set.
        """
        if not self.importance_pending:
            raise RuntimeError(
                "RoseLoRA prune_step() without a preceding update_importance(): call update_importance() after "
                "loss.backward() and before optimizer.step() in every optimizer step (or use "
                "peft_roselora.register_optimizer_hooks / RoseLoraCallback, which do it for you)."
            )
        start, end, _ = self.config.resolve_schedule()
        self.step += 1
        keep_ratio = sparsity.keep_ratio_at(self.step, self.config.keep_ratio, start, end)
        recompute = should_recompute_masks(
            self.step, keep_ratio, start, end, self.config.prune_interval, self.persistent, self.last_keep_ratio
        )
        if recompute and not self.importance_A:
            raise RuntimeError(
                "RoseLoRA cannot select masks: no finite importance was accumulated yet (every step so far had "
                "non-finite gradients)."
            )
        finite, checked = not self.pending_nonfinite, self.pending_checked_finite
        if not finite:
            self.nonfinite_steps += 1
        if recompute:
            self.last_keep_ratio = keep_ratio
        self.importance_pending = self.pending_nonfinite = self.pending_checked_finite = False
        return StepPlan(
            self.step, keep_ratio, recompute, clamp_bound(self.step, start, self.config.clamp_value), finite, checked
        )

    def skip(self) -> None:
        """The optimizer did not apply this step (GradScaler overflow): forget its importance, count it, keep ``t``."""
        self.importance_pending = self.pending_nonfinite = self.pending_checked_finite = False
        self.skipped_steps += 1

    def check_step(self, step: int) -> None:
        """Check that the schedule may jump to ``step`` (AdaLoRA-style ``update_and_allocate(global_step)``).

        Raises:
            ValueError: if ``step`` is not an int >= 0 or is below the current step.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"`global_step` must be an integer >= 0, got {step!r}.")
        if step < self.step:
            raise ValueError(
                f"`global_step` must increase from call to call: got {step} after the schedule reached step "
                f"{self.step} (update_and_allocate takes the 0-based index of the optimizer step just taken)."
            )

    def set_step(self, step: int) -> None:
        """Jump to ``step`` after :meth:`check_step`.

        Raises:
            ValueError: as :meth:`check_step`.
        """
        self.check_step(step)
        self.step = int(step)

    @property
    def importance_dtype(self) -> torch.dtype:
        """The EMAs' storage dtype (``config.importance_dtype``; configs older than the field hold float32)."""
        return torch.bfloat16 if getattr(self.config, "importance_dtype", "float32") == "bfloat16" else torch.float32

    def importance_of(self, module_names: list[str]) -> list[torch.Tensor]:
        """The EMAs ``[I_A, I_B]`` of each module in turn (the rows this process holds under FSDP2)."""
        return [store[name] for name in module_names for store in (self.importance_A, self.importance_B)]

    def selection_scores(
        self, importance_a: torch.Tensor, importance_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-major scores of one module for the top-k, from its whole EMAs and masks given as term rows
        (``RoseLoraLayer.term_rows``): ``(terms, n_a)`` for the rows of ``lora_A`` and ``(terms, n_b)`` for the
        columns of ``lora_B``."""
        return (
            selection_scores(importance_a, mask_a, self.persistent),
            selection_scores(importance_b, mask_b, self.persistent),
        )

    def scores_of(self, importance: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:func:`selection_scores` of (possibly stacked) importances and masks laid out alike; ``mask`` may be None
        outside persistent mode, where it is not read."""
        return selection_scores(importance, mask, self.persistent) if self.persistent else importance

    def _check_not_pending(self, call: str) -> None:
        if self.importance_pending:
            raise RuntimeError(
                f"RoseLoRA {call} ran twice in one optimizer step (the importance of this step was already taken): "
                "the schedule is driven twice, e.g. optimizer hooks on two optimizers, hooks plus RoseLoraCallback, "
                "or update_importance() called twice before prune_step()."
            )

    # -- state --

    def fingerprint(self) -> dict:
        """The configuration values the state was computed with (for the resume check)."""
        start, end, total = self.config.resolve_schedule() if self.config.total_step is not None else (None,) * 3
        return {
            "keep_ratio": float(self.config.keep_ratio),
            "prune_start_step": start,
            "prune_end_step": end,
            "total_step": total,
            "prune_interval": int(self.config.prune_interval),
            "prune_mode": self.config.prune_mode,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: counters, flags, the configuration fingerprint and the EMAs
        (detached CPU copies). Values are tensors, ints, floats, bools, strings and None, so the dict can travel in
        ``torch.save`` files loaded with ``weights_only=True``."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step,
            "importance_pending": self.importance_pending,
            "pending_nonfinite": self.pending_nonfinite,
            "last_keep_ratio": self.last_keep_ratio,
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "config": self.fingerprint(),
            "importance_A": {k: v.detach().cpu().clone() for k, v in self.importance_A.items()},
            "importance_B": {k: v.detach().cpu().clone() for k, v in self.importance_B.items()},
        }

    def load_state_dict(self, state: dict, shapes: dict[str, tuple[tuple, tuple]], devices: dict[str, torch.device]):
        """Restore what :meth:`state_dict` returned, checked against this adapter.

        Args:
            state (dict): the saved state.
            shapes (dict): module name -> ``(shape of lora_A, shape of lora_B)`` of this model.
            devices (dict): module name -> device of its factors.

        Raises:
            ScheduleStateError: a missing or unknown key, a wrong type, a module this adapter does not have, an EMA
                whose shape differs from its factor or that holds NaN / inf (corruption: the schedule keeps them
                finite), or a configuration fingerprint that differs from this adapter's
                (the message names the key or field and both values).
        """
        expected = {
            "format_version", "step", "importance_pending", "pending_nonfinite", "last_keep_ratio", "skipped_steps",
            "nonfinite_steps", "config", "importance_A", "importance_B",
        }  # fmt: skip
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ScheduleStateError(f"RoseLoRA schedule state has keys {keys}, expected {sorted(expected)}.")
        if state["format_version"] != STATE_FORMAT_VERSION:
            raise ScheduleStateError(
                f"RoseLoRA schedule state 'format_version' is {state['format_version']!r}, expected "
                f"{STATE_FORMAT_VERSION}."
            )
        for key in ("step", "skipped_steps", "nonfinite_steps"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ScheduleStateError(f"RoseLoRA schedule state '{key}' must be an int >= 0, got {state[key]!r}.")
        ours = self.fingerprint()
        for field_name in SCHEDULE_FIELDS:
            if state["config"].get(field_name) != ours[field_name]:
                raise ScheduleStateError(
                    f"RoseLoRA checkpoint was written with {field_name}={state['config'].get(field_name)!r}, this "
                    f"adapter has {field_name}={ours[field_name]!r}: resuming would continue a different schedule. "
                    "Resume with the checkpoint's configuration, or start a new run."
                )
        emas = {}
        for factor, position in (("importance_A", 0), ("importance_B", 1)):
            if not isinstance(state[factor], dict):
                raise ScheduleStateError(f"RoseLoRA schedule state '{factor}' must be a dict of tensors.")
            emas[factor] = {}
            for module_name, value in state[factor].items():
                if module_name not in shapes:
                    raise ScheduleStateError(
                        f"RoseLoRA schedule state '{factor}' names module '{module_name}', which this adapter does "
                        "not have."
                    )
                want = tuple(shapes[module_name][position])
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != want or not value.is_floating_point():
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ScheduleStateError(
                        f"RoseLoRA schedule state '{factor}' of module '{module_name}' has shape {got}, expected a "
                        f"float tensor of shape {want}."
                    )
                if not bool(torch.isfinite(value).all()):
                    raise ScheduleStateError(
                        f"RoseLoRA schedule state '{factor}' of module '{module_name}' holds non-finite values "
                        f"({int((~torch.isfinite(value)).sum())} of {value.numel()}): the schedule keeps its "
                        "importance EMAs finite, so the checkpoint is corrupt. Resume from another checkpoint."
                    )
                emas[factor][module_name] = value.to(device=devices[module_name], dtype=self.importance_dtype).clone()
        self.step = state["step"]
        self.importance_pending = bool(state["importance_pending"])
        self.pending_nonfinite = bool(state["pending_nonfinite"])
        self.last_keep_ratio = state["last_keep_ratio"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.importance_A, self.importance_B = emas["importance_A"], emas["importance_B"]
