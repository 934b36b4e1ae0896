"""What an edit reports: :class:`EditResult` per edit (or batch), :class:`SequenceCheckpoint` per checkpoint of a
sequence, and :func:`measure`, the one function that scores requests on a model (both are built from it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from . import metrics
from .data import EditRequest


class Scores(NamedTuple):
    """Means over requests, each in [0, 1] (None where no request has such prompts)."""

    reliability: Optional[float]
    generalization: Optional[float]
    locality: Optional[float]
    portability: Optional[float]


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def locality_predictions(model, tokenizer, request: EditRequest) -> list[torch.Tensor]:
    """``model``'s predictions on the request's locality prompts: the reference :func:`measure` compares to."""
    return metrics.locality_predictions(model, tokenizer, request.locality_prompts, request.locality_answers)


def measure(model, tokenizer, requests: Sequence[EditRequest], references: Sequence[list[torch.Tensor]]) -> Scores:
    """Score ``requests`` on ``model``: reliability (the edit prompt's target predicted, teacher-forced token
    accuracy), generalisation (the rephrased prompts'), locality (the locality prompts' predictions unchanged from
    ``references``, one list per request, see :func:`locality_predictions`) and portability."""
    return Scores(
        reliability=_mean([metrics.accuracy(model, tokenizer, [r.prompt], [r.target_new]) for r in requests]),
        generalization=_mean(
            [
                metrics.accuracy(model, tokenizer, r.rephrase_prompts, [r.target_new] * len(r.rephrase_prompts))
                for r in requests
            ]
        ),
        locality=_mean(
            [
                metrics.locality(reference, locality_predictions(model, tokenizer, r))
                for r, reference in zip(requests, references)
            ]
        ),
        portability=_mean(
            [metrics.accuracy(model, tokenizer, r.portability_prompts, r.portability_answers) for r in requests]
        ),
    )


def base_weight_count(model) -> int:
    """The model's parameters, adapter factors (``lora_*``) left out."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


@dataclass
class EditResult:
    """Per edit (or per batch): metrics in [0, 1] (None where the request has no such prompts), the steps taken,
    the loss at the first and last step, the base weights the edit changed, and seconds."""

    record_ids: list[Optional[int]]
    reliability: float
    generalization: Optional[float]
    locality: Optional[float]
    portability: Optional[float]
    steps: int
    first_loss: float
    last_loss: float
    changed_weights: int
    adapted_weights: int
    total_weights: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def changed_fraction_of_adapted(self) -> float:
        return self.changed_weights / max(1, self.adapted_weights)

    def to_dict(self) -> dict:
        return {**asdict(self), "changed_fraction_of_adapted": self.changed_fraction_of_adapted}

    def to_row(self) -> dict:
        """:meth:`to_dict` as strict JSON: a non-finite value is None and the row is marked ``failed`` with the
        names of those values."""
        row = self.to_dict()
        bad = [name for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
        for name in bad:
            row[name] = None
        if bad:
            row["failed"] = f"non-finite {', '.join(bad)}"
        return row


@dataclass
class SequenceCheckpoint:
    """Sequential editing after ``edits`` edits, every edit so far measured on the current model: ``retention`` (mean
    reliability), ``generalization``, ``locality`` (against the model before each edit's sequence started),
    ``portability``; ``changed_weights`` the base weights that now differ from the unedited model's (of
    ``editable_weights`` the method may change and ``total_weights``); ``seconds`` spent editing so far (measuring
    excluded)."""

    edits: int
    retention: float
    generalization: Optional[float]
    locality: Optional[float]
    portability: Optional[float]
    changed_weights: int
    editable_weights: int
    total_weights: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "changed_fraction_of_editable": self.changed_weights / max(1, self.editable_weights),
            "changed_fraction_of_all": self.changed_weights / max(1, self.total_weights),
        }
