"""The editing hyperparameters: one dataclass for every method, its field checks, the checks per editing mode (one
function the API and ``roselora-edit`` share), and the CLI options generated from the fields' metadata.

Each field's metadata says what it does (``help``), which methods read it (``methods``; None: every method) and,
where the CLI exposes it, its flag (``flag``) and value ``kind`` (see :data:`OPTION_KINDS`). Adding a field is one
``_field(...)`` line here: the checks, the CLI option and its help text follow from it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Optional

from .methods import REGISTRY, methods_where


MODES = ("single", "batch", "sequential")

# kind -> (converter, what it expects, valid) for the generated CLI options
OPTION_KINDS = {
    "float>0": (float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "float>=0": (float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "ratio": (float, "in (0, 1]", lambda v: math.isfinite(v) and 0 < v <= 1),
    "fraction": (float, "a number in [0, 1]", lambda v: math.isfinite(v) and 0 <= v <= 1),
    "int>=1": (int, "an integer >= 1", lambda v: v >= 1),
    "int>=0": (int, "an integer >= 0", lambda v: v >= 0),
    "int": (int, "an integer", lambda v: True),
}


def _field(default: Any, help: str, flag: Optional[str] = None, kind: Optional[str] = None, methods=None, **extra):
    """A dataclass field with its metadata: ``help``, the ``methods`` reading it, its CLI ``flag`` and ``kind``."""
    metadata = {"help": help, "methods": methods, "flag": flag, "kind": kind, **extra}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


ADAPTERS = ("roselora", "lora", "adalora")
GRADIENT = ("roselora", "lora", "adalora", "ft-l")
LOCATE = ("memit", "alphaedit")


@dataclass
class EditHyperParams:
    """The method and its hyperparameters. Defaults: the authors' RoseLoRA editing recipe (docs/method.md) except
    where SmolLM2-135M-Instruct's dev records chose otherwise (docs/results/editing.md, "Defaults"): the adapter on
    ``down_proj`` of every layer (the recipe: ``q_proj``, ``v_proj``), Adam lr 1e-3 (5e-4) and no clamp (3e-3), with
    which the recipe's values do not edit that model. :meth:`authors_recipe` gives the recipe itself. The gradient
    baselines share ``steps``, ``r``, ``lr`` and ``target_modules``. Every field's help text (also
    ``roselora-edit --help``) says which methods read it.

    Gradient methods (RoseLoRA, LoRA, AdaLoRA, FT-L) in sequences also have the many-edit mode: ``replay`` earlier
    edits in each step's loss (``replay_priority`` of them drawn by their loss, see :func:`replay_picks`) and
    ``preserve_weight`` times the cross-entropy to the *unedited* model's predictions on ``preserve_batch`` texts of
    the editor's text sample. ``shared_adapter`` (RoseLoRA, LoRA) trains one adapter for the whole sequence (RoseLoRA:
    its support chosen by the first edit and fixed after it, ``prune_mode="persistent"``), ``shared_optimizer`` one
    Adam for it. ``hold_steps`` trains on after ``steps`` until the edit holds.

    Raises:
        ValueError: a value outside its range (named, with the value), or a combination the methods refuse.
    """

    method: Literal["roselora", "lora", "adalora", "ft-l", "memit", "alphaedit"] = _field(
        "roselora", "the editing method (see peft_roselora.editing.METHODS)"
    )
    r: int = _field(8, "adapter rank", "--r", "int>=1", ADAPTERS)
    lora_alpha: int = _field(32, "lora_alpha", "--alpha", "float>0", ADAPTERS)
    lora_dropout: float = _field(0.1, "adapter dropout", methods=ADAPTERS)
    target_modules: tuple[str, ...] = _field(("down_proj",), "target modules", "--targets", "strings", ADAPTERS)
    adapter_layers: Optional[tuple[int, ...]] = _field(
        None,
        "decoder layers the adapter is placed on (PEFT's layers_to_transform; default every layer)",
        "--adapter-layers",
        "ints",
        ADAPTERS,
    )
    lr: float = _field(1e-3, "learning rate", "--lr", "float>0", GRADIENT)
    steps: int = _field(
        25, "optimizer steps per edit (the CLI scales the schedule in proportion)", "--steps", "int>=1", GRADIENT
    )
    keep_ratio: float = _field(0.05, "RoseLoRA keep ratio", "--keep-ratio", "ratio", ("roselora",))
    prune_start_step: int = _field(
        3, "RoseLoRA: dense until this step (AdaLoRA: its tinit)", methods=("roselora", "adalora")
    )
    prune_end_step: int = _field(
        20,
        "RoseLoRA: the final keep ratio from this step (AdaLoRA: tfinal = steps - this); every gradient method may "
        "stop early only after it",
        methods=GRADIENT,
    )
    clamp_value: Optional[float] = _field(
        None, "RoseLoRA clamp of the factors", "--clamp", "float>0", ("roselora",), negation="--no-clamp"
    )
    early_stop_loss: float = _field(0.1, "stop once the loss is below this (after prune_end_step)", methods=GRADIENT)
    adalora_target_r: Optional[int] = _field(None, "AdaLoRA target rank (default r // 2)", methods=("adalora",))
    ft_layer: Optional[int] = _field(
        None,
        "FT-L: decoder layer whose MLP down projection is tuned (default the middle one)",
        "--ft-layer",
        "int",
        ("ft-l",),
    )
    ft_norm: float = _field(5e-4, "FT-L: L-infinity bound on the weight change", "--ft-norm", "float>0", ("ft-l",))
    edit_layers: Optional[tuple[int, ...]] = _field(
        None, "MEMIT / AlphaEdit layers (default a block at 15-30 %% of the depth)", "--edit-layers", "ints", LOCATE
    )
    fact_token: Literal["subject_last", "last"] = _field(
        "subject_last",
        "MEMIT / AlphaEdit: where keys are read",
        "--fact-token",
        "choice",
        LOCATE,
        choices=("subject_last", "last"),
    )
    v_lr: float = _field(0.5, "MEMIT / AlphaEdit: target vector lr", "--v-lr", "float>0", LOCATE)
    v_steps: int = _field(25, "MEMIT / AlphaEdit: target vector steps", "--v-steps", "int>=1", LOCATE)
    v_weight_decay: float = _field(1e-3, "MEMIT / AlphaEdit: target vector weight decay", methods=LOCATE)
    kl_factor: float = _field(0.0625, "MEMIT / AlphaEdit: KL weight of the target vector", methods=LOCATE)
    clamp_norm_factor: float = _field(4.0, "MEMIT / AlphaEdit: target vector norm bound", methods=LOCATE)
    mom2_weight: float = _field(15000.0, "MEMIT: lambda", "--mom2-weight", "float>0", ("memit",))
    nullspace_threshold: float = _field(
        2e-2, "AlphaEdit: null-space threshold", "--nullspace-threshold", "float>0", ("alphaedit",)
    )
    l2: float = _field(10.0, "AlphaEdit: l2 regulariser", "--l2", "float>0", ("alphaedit",))
    replay: int = _field(
        0, "many-edit mode: earlier edits replayed in every step (sequences)", "--replay", "int>=0", GRADIENT
    )
    replay_priority: float = _field(
        0.0,
        "many-edit mode, with --replay: fraction of each step's replayed edits drawn in proportion to their target "
        "loss as the edit starts (forgotten edits first; 0: uniform)",
        "--replay-priority",
        "fraction",
        GRADIENT,
    )
    replay_score_limit: Optional[int] = _field(
        None,
        "many-edit mode, with --replay-priority: score at most this many earlier edits (drawn at random) as an edit "
        "starts and draw the prioritised replays among them, a cost that stays constant along a sequence (default: "
        "score every earlier edit, a cost that grows with the number of edits)",
        "--replay-score-limit",
        "int>=1",
        GRADIENT,
    )
    preserve_weight: float = _field(
        0.0,
        "many-edit mode: weight of the cross-entropy to the unedited model's predictions on the text sample",
        "--preserve-weight",
        "float>=0",
        GRADIENT,
    )
    preserve_batch: int = _field(
        8,
        "many-edit mode: texts of the text sample in each step's preservation loss",
        "--preserve-batch",
        "int>=1",
        GRADIENT,
    )
    preserve_tokens: Optional[int] = _field(
        None,
        "many-edit mode: the preservation loss reads the first this many tokens of each text (its predictions there "
        "are the unedited model's on the whole text: causal), so short edit rows are not padded to long texts "
        "(default: whole texts)",
        "--preserve-tokens",
        "int>=1",
        GRADIENT,
    )
    many_edit_every: int = _field(
        1,
        "many-edit mode: the replayed edits and the preservation texts join the loss of every this many steps (the "
        "first included), weighted so that over that many steps they weigh what they weigh at every step; the "
        "steps between train the edit alone, at a single edit's cost (and early_stop_loss reads them)",
        "--many-edit-every",
        "int>=1",
        GRADIENT,
    )
    shared_adapter: bool = _field(
        False,
        "sequences: every edit trains one adapter kept across the sequence (RoseLoRA: one support, fixed after the "
        "first edit) instead of a fresh adapter merged after each edit",
        "--shared-adapter",
        "flag",
        methods_where("supports_shared_adapter"),
    )
    shared_optimizer: bool = _field(
        False,
        "with --shared-adapter: one Adam optimizer for the whole sequence instead of a fresh one per edit",
        "--shared-optimizer",
        "flag",
        methods_where("supports_shared_adapter"),
    )
    hold_steps: int = _field(
        0,
        "up to this many more steps after --steps, until the edit holds (every target token predicted)",
        "--hold-steps",
        "int>=0",
        methods_where("supports_hold"),
    )

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise ValueError(f"`method` must be one of {list(REGISTRY)}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if not 0 <= self.prune_start_step < self.prune_end_step <= self.steps:
            raise ValueError(
                f"the schedule must satisfy 0 <= prune_start_step < prune_end_step <= steps, got "
                f"prune_start_step={self.prune_start_step}, prune_end_step={self.prune_end_step}, steps={self.steps}"
            )
        if self.adalora_target_r is not None and not 1 <= self.adalora_target_r <= self.r:
            raise ValueError(f"`adalora_target_r` must be in [1, r={self.r}], got {self.adalora_target_r}")
        for name in ("v_lr", "mom2_weight", "nullspace_threshold", "l2", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "preserve_weight", "replay", "hold_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.replay_priority <= 1:
            raise ValueError(f"`replay_priority` must be in [0, 1], got {self.replay_priority}")
        if self.replay_priority > 0 and self.replay == 0:
            raise ValueError(f"`replay_priority={self.replay_priority}` needs `replay` > 0 (earlier edits replayed)")
        if self.replay_score_limit is not None:
            if not self.replay_score_limit >= 1:
                raise ValueError(
                    f"`replay_score_limit` must be None or an integer >= 1, got {self.replay_score_limit}"
                )
            if self.replay_priority == 0:
                raise ValueError(
                    f"`replay_score_limit={self.replay_score_limit}` needs `replay_priority` > 0 (only the "
                    "prioritised replay scores earlier edits)"
                )
        if self.preserve_tokens is not None and not self.preserve_tokens >= 2:
            raise ValueError(
                f"`preserve_tokens` must be None or an integer >= 2 (a token and the next), got {self.preserve_tokens}"
            )
        if self.preserve_tokens is not None and self.preserve_weight == 0:
            raise ValueError(
                f"`preserve_tokens={self.preserve_tokens}` needs `preserve_weight` > 0 (a preservation loss to crop)"
            )
        if not self.many_edit_every >= 1:
            raise ValueError(f"`many_edit_every` must be an integer >= 1, got {self.many_edit_every}")
        if self.many_edit_every > 1 and not (self.replay or self.preserve_weight):
            raise ValueError(
                f"`many_edit_every={self.many_edit_every}` needs the many-edit mode (`replay` > 0 or "
                "`preserve_weight` > 0)"
            )
        for name in ("v_steps", "preserve_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.fact_token not in ("subject_last", "last"):
            raise ValueError(f"`fact_token` must be 'subject_last' or 'last', got {self.fact_token!r}")
        for name in ("shared_adapter", "hold_steps"):
            allowed = field_metadata(name)["methods"]
            if getattr(self, name) and self.method not in allowed:
                raise ValueError(f"`{name}` needs method in {list(allowed)}, got method={self.method!r}")
        if self.shared_optimizer and not self.shared_adapter:
            raise ValueError("`shared_optimizer=True` needs `shared_adapter=True` (one adapter for the sequence)")
        if self.edit_layers is not None:
            self.edit_layers = tuple(self.edit_layers)
        if self.adapter_layers is not None:
            self.adapter_layers = tuple(self.adapter_layers)
            if not self.adapter_layers or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.adapter_layers
            ):
                raise ValueError(f"`adapter_layers` must be layer indices >= 0, got {self.adapter_layers!r}")
        self.target_modules = tuple(self.target_modules)

    @classmethod
    def authors_recipe(cls, **overrides) -> EditHyperParams:
        """The authors' RoseLoRA editing recipe for Llama-2-7b-chat (docs/method.md, "Knowledge editing"):
        ``q_proj`` and ``v_proj`` of every layer, Adam lr 5e-4, clamp 3e-3, the rest as the defaults. The defaults
        differ where SmolLM2-135M-Instruct's dev records chose otherwise (docs/results/editing.md): there this
        recipe does not edit (dev reliability 0.12)."""
        return cls(**{"target_modules": ("q_proj", "v_proj"), "lr": 5e-4, "clamp_value": 3e-3, **overrides})

    @classmethod
    def scaled_to(cls, steps: int, **kwargs) -> EditHyperParams:
        """The recipe with ``steps`` optimizer steps and its schedule scaled in proportion (3/25 dense, final keep
        ratio at 20/25 of the steps)."""
        return cls.from_config(kwargs.pop("method", "roselora"), {"steps": steps, **kwargs})

    @classmethod
    def from_config(cls, method: str, config: dict) -> EditHyperParams:
        """The hyperparameters of a configuration dict (as ``benchmarks/editing/search.py`` writes them and
        ``roselora-edit --config`` reads them): any field of this class, where ``steps`` scales the schedule in
        proportion (dense until 3/25 of the steps, final keep ratio at ``schedule_end`` of them, default 0.8) unless
        ``prune_start_step`` / ``prune_end_step`` are given, and ``adalora_target_fraction`` sets AdaLoRA's target
        rank to that fraction of ``r``.

        Raises:
            ValueError: an unknown key (named), or a value the fields reject.
        """
        config = dict(config)
        steps = config.pop("steps", 25)
        end = config.pop("schedule_end", 0.8)
        fraction = config.pop("adalora_target_fraction", None)
        unknown = sorted(set(config) - set(cls.__dataclass_fields__) - {"method"})
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        if fraction is not None:
            config["adalora_target_r"] = max(1, round(fraction * config.get("r", 8)))
        start = config.pop("prune_start_step", round(steps * 3 / 25))
        config.setdefault("prune_end_step", min(steps, max(start + 1, round(steps * end))))
        config.pop("method", None)
        return cls(method=method, steps=steps, prune_start_step=start, **config)


def field_metadata(name: str) -> dict:
    """The metadata of one :class:`EditHyperParams` field (``help``, ``methods``, ``flag``, ``kind``, ...)."""
    return EditHyperParams.__dataclass_fields__[name].metadata


# ---- the checks per editing mode ---------------------------------------------------------------------------------


class Problem(NamedTuple):
    """A setting the mode refuses: ``field`` (an :class:`EditHyperParams` field, or ``"stats_texts"``) and the
    API's message."""

    field: str
    message: str


def mode_problems(hparams: EditHyperParams, mode: str, has_stats_texts: bool) -> list[Problem]:
    """What ``mode`` (``"single"``, ``"batch"``, ``"sequential"``, or None: any) refuses in ``hparams`` with or
    without a text sample: the one set of rules ``Editor`` and ``roselora-edit`` apply.

    - ``shared_adapter`` and ``replay`` apply to sequences only (single and batch edits restore the unedited model
      after every edit, so there is nothing to share or replay);
    - MEMIT / AlphaEdit (their key statistics) and ``preserve_weight`` > 0 need the text sample.

    Raises:
        ValueError: ``mode`` not one of :data:`MODES`.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"`mode` must be one of {list(MODES)}, got {mode!r}")
    problems = []
    if mode in ("single", "batch"):
        if hparams.shared_adapter:
            problems.append(
                Problem(
                    "shared_adapter",
                    "`shared_adapter=True` applies to sequences (edit_sequence / edit_sequential / apply); "
                    "edit_single and edit_batch restore the unedited model after every edit",
                )
            )
        if hparams.replay:
            problems.append(
                Problem(
                    "replay",
                    f"`replay={hparams.replay}` applies to sequences (edit_sequence / edit_sequential / apply): "
                    "edit_single and edit_batch have no earlier edits to replay",
                )
            )
    if not has_stats_texts:
        if REGISTRY[hparams.method].needs_stats_texts:
            problems.append(
                Problem(
                    "stats_texts",
                    f"method {hparams.method!r} needs `stats_texts`: a sample of text the model has seen (its "
                    "training text, or text like it) for the key statistics",
                )
            )
        if hparams.preserve_weight > 0:
            problems.append(
                Problem(
                    "stats_texts",
                    f"`preserve_weight`={hparams.preserve_weight} needs `stats_texts` (the texts whose predictions "
                    f"to preserve); got none",
                )
            )
    return problems


def check_mode(hparams: EditHyperParams, mode: Optional[str], has_stats_texts: bool) -> None:
    """Raise the first of :func:`mode_problems`.

    Raises:
        ValueError: a setting ``mode`` refuses (see :func:`mode_problems`).
    """
    problems = mode_problems(hparams, mode, has_stats_texts)
    if problems:
        raise ValueError(problems[0].message)


# ---- the CLI options, from the fields' metadata ------------------------------------------------------------------


def option_type(flag: str, kind: str):
    """An argparse ``type`` for a value of ``kind`` (see :data:`OPTION_KINDS`); errors name the option, what it
    expects and the text given."""
    convert, expected, valid = OPTION_KINDS[kind]

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {expected}, got {text!r}")
        return value

    return parse


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_hparam_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`EditHyperParams` field with a ``flag``, each defaulting to None (not given)."""
    for spec in fields(EditHyperParams):
        meta = spec.metadata
        if not meta.get("flag"):
            continue
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        shown = " ".join(default) if isinstance(default, tuple) else default
        methods = f"{' / '.join(meta['methods'])}: " if meta["methods"] and len(meta["methods"]) < 4 else ""
        text = f"{methods}{meta['help']} (default {shown})"
        kind, flag = meta["kind"], meta["flag"]
        target = parser
        if meta.get("negation"):
            target = parser.add_mutually_exclusive_group()
        if kind == "flag":
            target.add_argument(flag, action="store_true", default=None, help=text)
        elif kind == "strings":
            target.add_argument(flag, nargs="+", default=None, help=text)
        elif kind == "ints":
            target.add_argument(flag, nargs="+", type=int, default=None, help=text)
        elif kind == "choice":
            target.add_argument(flag, choices=list(meta["choices"]), default=None, help=text)
        else:
            target.add_argument(flag, type=option_type(flag, kind), default=None, help=text)
        if meta.get("negation"):
            target.add_argument(meta["negation"], action="store_true", help=f"turn {spec.name} off (None)")


def hparam_values(args: argparse.Namespace) -> dict:
    """The :class:`EditHyperParams` fields given on the command line (options left out are not in the dict)."""
    values = {}
    for spec in fields(EditHyperParams):
        meta = spec.metadata
        if not meta.get("flag"):
            continue
        if meta.get("negation") and getattr(args, _dest(meta["negation"])):
            values[spec.name] = None
            continue
        value = getattr(args, _dest(meta["flag"]))
        if value is not None:
            values[spec.name] = tuple(value) if isinstance(value, list) else value
    return values
