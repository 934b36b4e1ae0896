"""``RoseLoraConfig``: a ``LoraConfig`` with the RoseLoRA sparsity schedule."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft import LoraConfig
from peft.utils import PeftType

from .sparsity import resolve_step


PRUNE_MODES = ("reselect", "persistent")
IMPORTANCE_DTYPES = ("float32", "bfloat16")
# deprecated spellings of prune_mode (accepted with a FutureWarning until 0.3)
_DEPRECATED_PRUNE_MODES = {"authors": "reselect"}

# LoRA options that change what the adapter computes and that RoseLoRA does not implement. Each entry is the config
# field and a predicate telling whether the user switched it on.
_UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": lambda value: bool(value),
    "use_bdlora": lambda value: value is not None,
    "alora_invocation_tokens": lambda value: value is not None,
    "arrow_config": lambda value: value is not None,
    "velora_config": lambda value: value is not None,
    "monteclora_config": lambda value: value is not None,
    "kasa_config": lambda value: value is not None,
    "use_qalora": lambda value: bool(value),
    "megatron_config": lambda value: value is not None,
    "ensure_weight_tying": lambda value: bool(value),
}
_SUPPORTED_INIT_LORA_WEIGHTS = (True, False, "gaussian")


@dataclass
class RoseLoraConfig(LoraConfig):
    """Configuration of a RoseLoRA adapter: LoRA whose ``lora_A`` rows and ``lora_B`` columns are pruned to a keep
    ratio during training.

    Every ``LoraConfig`` field keeps its meaning (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``,
    ``use_rslora``, ``modules_to_save``, ...). The RoseLoRA fields drive the schedule of ``docs/method.md``:
    the keep ratio is 1 up to step ``prune_start_step``, follows a cubic decay, and is ``keep_ratio`` from
    ``prune_end_step`` on. Steps are optimizer steps. ``prune_start_step`` and ``prune_end_step`` accept a step count
    (``int``) or a fraction of ``total_step`` (``float`` in ``[0, 1]``).

    Raises:
        ValueError: for any field out of range (the message names the field, the value and the valid range) and for
            LoRA options RoseLoRA does not implement (DoRA and the other LoRA variants, ``target_parameters``,
            ``init_lora_weights`` other than ``True``/``False``/``"gaussian"``, ...).
    """

    keep_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Final keep ratio tau in (0, 1]: the fraction of entries kept in every row of lora_A and every "
            "column of lora_B. The authors' knowledge-editing value is 0.05; 0.1 is a fine-tuning default."
        },
    )
    prune_start_step: Union[int, float] = field(
        default=0.1,
        metadata={
            "help": "t_i: the last dense (warm-up) optimizer step. An int is a step count; a float in [0, 1] is a "
            "fraction of total_step (rounded down)."
        },
    )
    prune_end_step: Union[int, float] = field(
        default=0.8,
        metadata={
            "help": "t_f: the optimizer step at which keep_ratio is reached. An int is a step count; a float in "
            "[0, 1] is a fraction of total_step (rounded up). Must be > prune_start_step and <= total_step."
        },
    )
    total_step: Optional[int] = field(
        default=None,
        metadata={
            "help": "T: total optimizer steps. May stay None until a trainer sets it (RoseLoraCallback takes it "
            "from the Trainer's max_steps); using the schedule before it is set raises an error."
        },
    )
    importance_beta: float = field(
        default=0.8,
        metadata={"help": "EMA coefficient beta in [0, 1) of the sensitivity |w * grad| (authors' value 0.8)."},
    )
    importance_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Storage dtype of the importance EMAs: 'float32' (default; the authors' arithmetic, one fp32 copy "
            "of the adapter) or 'bfloat16' (half the memory; each update is computed in fp32 and rounded once to "
            "bfloat16, so top-k ties and near-ties may select differently from fp32)."
        },
    )
    prune_interval: int = field(
        default=1,
        metadata={"help": "Recompute the masks every this many optimizer steps (>= 1; the authors prune every step)."},
    )
    clamp_value: Optional[float] = field(
        default=None,
        metadata={
            "help": "If set (> 0), clamp every entry of lora_A and lora_B to [-clamp_value, clamp_value] once "
            "pruning has started (the paper's norm constraint for knowledge editing, 3e-3). None: off."
        },
    )
    prune_mode: Literal["reselect", "persistent"] = field(
        default="reselect",
        metadata={
            "help": "'reselect': every prune re-selects the top entries by importance among all entries and gradients "
            "are not masked (the authors' code). 'persistent': an entry once pruned stays pruned and its gradient is "
            "masked. Both keep the saved, merged and evaluated weights exactly sparse. 'authors' is a deprecated "
            "spelling of 'reselect'."
        },
    )

    def __post_init__(self) -> None:
        # before LoraConfig's own checks, which would first demand the extras of options we reject anyway (and
        # compare numbers with strings read from a hand-edited adapter_config.json)
        self._check_lora_options()
        self._check_lora_field_types()
        if self.prune_mode in _DEPRECATED_PRUNE_MODES:
            warnings.warn(
                f"prune_mode={self.prune_mode!r} is deprecated; use {_DEPRECATED_PRUNE_MODES[self.prune_mode]!r} "
                "(same behaviour).",
                FutureWarning,
                stacklevel=3,
            )
            self.prune_mode = _DEPRECATED_PRUNE_MODES[self.prune_mode]
        super().__post_init__()
        self.peft_type = PeftType.ROSELORA
        self._check_schedule_fields()

    def _check_lora_options(self) -> None:
        for name, is_enabled in _UNSUPPORTED_LORA_OPTIONS.items():
            value = getattr(self, name, None)
            if is_enabled(value):
                raise ValueError(
                    f"RoseLoraConfig does not support the LoRA option `{name}` (got {value!r}); RoseLoRA implements "
                    "plain LoRA with row/column-sparse factors. Leave it at its default."
                )
        if self.init_lora_weights not in _SUPPORTED_INIT_LORA_WEIGHTS:
            raise ValueError(
                f"RoseLoraConfig does not support `init_lora_weights={self.init_lora_weights!r}`; valid values are "
                f"{list(_SUPPORTED_INIT_LORA_WEIGHTS)}."
            )

    def _check_lora_field_types(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be an integer >= 1, got {self.r!r}.")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a finite number > 0, got {self.lora_alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {self.lora_dropout!r}.")
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")

    def _check_schedule_fields(self) -> None:
        if not _is_number(self.keep_ratio) or not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"`keep_ratio` must be a number in (0, 1], got {self.keep_ratio!r}.")
        if not _is_number(self.importance_beta) or not 0.0 <= self.importance_beta < 1.0:
            raise ValueError(f"`importance_beta` must be a number in [0, 1), got {self.importance_beta!r}.")
        if (
            isinstance(self.prune_interval, bool)
            or not isinstance(self.prune_interval, int)
            or self.prune_interval < 1
        ):
            raise ValueError(f"`prune_interval` must be an integer >= 1, got {self.prune_interval!r}.")
        if self.clamp_value is not None and not (
            _is_number(self.clamp_value) and math.isfinite(self.clamp_value) and self.clamp_value > 0
        ):
            raise ValueError(f"`clamp_value` must be None (off) or a number > 0, got {self.clamp_value!r}.")
        if not isinstance(self.importance_dtype, str) or self.importance_dtype not in IMPORTANCE_DTYPES:
            raise ValueError(
                f"`importance_dtype` must be one of {list(IMPORTANCE_DTYPES)}, got {self.importance_dtype!r}."
            )
        if not isinstance(self.prune_mode, str) or self.prune_mode not in PRUNE_MODES:
            raise ValueError(f"`prune_mode` must be one of {list(PRUNE_MODES)}, got {self.prune_mode!r}.")
        if self.total_step is not None and (
            isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step < 1
        ):
            raise ValueError(
                f"`total_step` must be None (set later by a trainer) or an integer >= 1, got {self.total_step!r}."
            )
        for name in ("prune_start_step", "prune_end_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"`{name}` must be an int step count >= 0 or a float fraction in [0, 1], got {value!r}."
                )
            if isinstance(value, float) and not 0.0 <= value <= 1.0:  # NaN fails too
                raise ValueError(
                    f"`{name}` given as a float is a fraction of total_step and must be in [0, 1], got {value}."
                )
            if isinstance(value, int) and value < 0:
                raise ValueError(f"`{name}` given as an int is a step count and must be >= 0, got {value}.")
        if isinstance(self.prune_start_step, int) and isinstance(self.prune_end_step, int):
            if self.prune_start_step >= self.prune_end_step:
                raise ValueError(
                    f"`prune_start_step` ({self.prune_start_step}) must be < `prune_end_step` ({self.prune_end_step})."
                )
        if isinstance(self.prune_start_step, float) and isinstance(self.prune_end_step, float):
            if self.prune_start_step >= self.prune_end_step:
                raise ValueError(
                    f"`prune_start_step` ({self.prune_start_step}) must be < `prune_end_step` ({self.prune_end_step})."
                )
        if self.total_step is not None:
            self.resolve_schedule()

    def resolve_schedule(self) -> tuple[int, int, int]:
        """The schedule in optimizer steps: ``(t_i, t_f, T)``, fractions resolved against ``total_step``.

        Raises:
            ValueError: if ``total_step`` is not set yet, or the resolved steps violate ``t_i < t_f <= T``.
        """
        if self.total_step is None:
            raise ValueError(
                "RoseLoRA's schedule needs `total_step` (T), which is not set. Pass `total_step=` to RoseLoraConfig, "
                "or train with `RoseLoraCallback`, which sets it from the Trainer's max_steps at train begin."
            )
        total = self.total_step
        start = resolve_step(self.prune_start_step, total, round_up=False)
        end = resolve_step(self.prune_end_step, total, round_up=True)
        if not start < end <= total:
            raise ValueError(
                f"RoseLoRA's schedule must satisfy prune_start_step < prune_end_step <= total_step, got "
                f"prune_start_step={self.prune_start_step!r} -> {start}, prune_end_step={self.prune_end_step!r} -> "
                f"{end}, total_step={total}."
            )
        return start, end, total


def _is_number(value) -> bool:
    """An int or float (not a bool, not a string): the type of every numeric config field."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
