"""The contract every editing method's backend follows (:class:`EditBackend`) and the typed result of one edit
(:class:`EditOutcome`). A backend owns the model it edits: the base model, or the PeftModel of a shared adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

import torch

from ..data import EditRequest
from ..objective import EditObjective


if TYPE_CHECKING:
    from ..hparams import EditHyperParams


SHARED_PREFIX = "shared."


@dataclass
class EditOutcome:
    """One edit (of one request, or of a batch) as a backend made it.

    Attributes:
        model: the model to measure the edit on (the base model, or a PeftModel holding the edit's adapter).
        losses: the loss of every optimizer step (MEMIT / AlphaEdit: of the target-vector optimisation).
        changed_weights: base weights the edit changed (for an adapter: non-zeros of its merged delta).
        adapted_weights: base weights the method could change in this edit.
        restore: undoes the edit (None when the edit is kept).
    """

    model: torch.nn.Module
    losses: list[float]
    changed_weights: int
    adapted_weights: int
    restore: Optional[Callable[[], None]] = None


class EditBackend:
    """One editing method on one model.

    Class attributes declare what the method can do; :mod:`peft_roselora.editing.hparams` reads them for its checks:
    ``needs_stats_texts`` (a text sample is required), ``supports_shared_adapter``, ``supports_hold``.

    Args:
        model: the causal LM, edited in place.
        tokenizer: its tokenizer.
        hparams: the editor's hyperparameters.
        objective: the edit objective (gradient methods train it).
        stats_texts: the text sample, or None.
    """

    name: ClassVar[str]
    needs_stats_texts: ClassVar[bool] = False
    supports_shared_adapter: ClassVar[bool] = False
    supports_hold: ClassVar[bool] = False

    def __init__(
        self, model, tokenizer, hparams: EditHyperParams, objective: EditObjective, stats_texts: Optional[list[str]]
    ) -> None:
        self.base = model
        self.tokenizer, self.hparams, self.objective = tokenizer, hparams, objective

    @property
    def model(self) -> torch.nn.Module:
        """The model as edited so far (what the next edit starts from and what checkpoints measure)."""
        return self.base

    @property
    def shared_adapter(self):
        """The PeftModel of a shared adapter; None for every other method and mode."""
        return None

    def edit(self, requests: Sequence[EditRequest], memory: Sequence[EditRequest], keep: bool) -> EditOutcome:
        """Edit ``requests`` into the model after the edits ``memory``; with ``keep`` the edit stays (sequences),
        otherwise ``EditOutcome.restore`` undoes it."""
        raise NotImplementedError

    def editable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The base weights the method can change, by parameter name."""
        raise NotImplementedError

    def adapter_changed_weights(self) -> int:
        """Base weights changed by an adapter kept beside the base (the shared adapter's delta); 0 otherwise."""
        return 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own state beyond the editable weights (tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], edits_done: int) -> None:
        """Restore :meth:`state_dict` (``state`` is the editor's whole state of ``edits_done`` edits).

        Raises:
            ValueError: the state holds a shared adapter this backend does not take.
        """
        if any(key.startswith(SHARED_PREFIX) for key in state):
            raise ValueError(
                "the state holds a shared adapter, but this editor has `shared_adapter=False` or already one"
            )
