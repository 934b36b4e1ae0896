"""``Editor``: knowledge editing with one method (RoseLoRA, the authors' recipe, or a baseline: LoRA, AdaLoRA,
FT-L, MEMIT, AlphaEdit) on one causal LM.

The editor keeps what a sequence of edits shares: the edits made (``memory``), the unedited model's predictions
each edit's locality is measured against, the unedited editable weights (to count the weights changed), and the
editing time. Everything else has its own module: the method's backend (``methods``, chosen from the registry by
``hparams.method``) makes each edit and owns the model; ``objective`` is the loss it trains; ``results`` measures;
``hparams`` checks the settings per mode.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from .data import EditRequest
from .hparams import EditHyperParams, check_mode
from .methods import REGISTRY, EditOutcome
from .objective import EditObjective, replay_picks  # noqa: F401  (replay_picks: re-exported)
from .results import EditResult, SequenceCheckpoint, base_weight_count, locality_predictions, measure


METHODS = tuple(REGISTRY)


class Editor:
    """Edits facts into a causal LM with one method; the model is restored to its unedited weights after every
    ``edit_single`` / ``edit_batch`` (``edit_sequence`` / ``edit_sequential`` / ``apply`` keep the edits).

    Args:
        model: a causal LM (for MEMIT / AlphaEdit and FT-L with Llama-style MLPs).
        tokenizer: its tokenizer.
        hparams: the method and its hyperparameters (default: RoseLoRA with the authors' recipe).
        stats_texts: a text sample like the model's training text: MEMIT / AlphaEdit's key statistics and the
            many-edit mode's preservation loss (``preserve_weight``) read it; required for those.

    Raises:
        ValueError: a method or option that needs ``stats_texts`` without it (see ``hparams.mode_problems``).
    """

    def __init__(self, model, tokenizer, hparams: Optional[EditHyperParams] = None, stats_texts=None) -> None:
        self.hparams = hparams or EditHyperParams()
        self.stats_texts = list(stats_texts) if stats_texts is not None else None
        check_mode(self.hparams, None, bool(self.stats_texts))
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.objective = EditObjective(tokenizer, self.hparams, self.stats_texts, self.device)
        self.backend = REGISTRY[self.hparams.method](
            model.eval(), tokenizer, self.hparams, self.objective, self.stats_texts
        )
        self.memory: list[EditRequest] = []  # the edits this editor kept, in order (sequential editing)
        self.seconds_editing = 0.0  # editing time of the sequence so far (measuring excluded)
        self._references: dict[int, list[torch.Tensor]] = {}  # request id -> predictions before its edit
        self._unedited: Optional[dict[str, torch.Tensor]] = None  # editable weights before the first kept edit

    @property
    def model(self) -> torch.nn.Module:
        """The model as edited so far (a PeftModel with a shared adapter, otherwise the base model)."""
        return self.backend.model

    @property
    def shared_adapter(self):
        """The ``PeftModel`` whose one adapter holds every edit of a ``shared_adapter`` sequence (None before the
        first edit, or without ``shared_adapter``): ``save_pretrained`` it, or ``unload()`` it to undo every edit."""
        return self.backend.shared_adapter

    # ---- one edit, undone ----------------------------------------------------------------------------------------

    def edit_single(self, request: EditRequest) -> EditResult:
        """Edit one fact from the unedited model, measure, and restore the model."""
        return self.edit_batch([request])

    def edit_batch(self, requests: list[EditRequest]) -> EditResult:
        """Edit several facts with one adapter (one loss over all; one MEMIT / AlphaEdit update), measure each, and
        restore the model.

        Raises:
            ValueError: with ``shared_adapter`` or ``replay``, which only sequences use.
        """
        check_mode(self.hparams, "batch", bool(self.stats_texts))
        references = [locality_predictions(self.model, self.tokenizer, r) for r in requests]
        start = time.perf_counter()
        outcome = self.backend.edit(requests, (), keep=False)
        result = self._result(outcome.model, requests, references, outcome, time.perf_counter() - start)
        outcome.restore()
        return result

    # ---- edits kept ------------------------------------------------------------------------------------------------

    def apply(self, requests: list[EditRequest]):
        """Edit and keep the edits: returns ``(edited model, results)`` as :meth:`edit_sequential` makes them."""
        results = self.edit_sequential(requests)
        return self.model, results

    def edit_sequential(self, requests: list[EditRequest]) -> list[EditResult]:
        """Apply edits one after another, keeping each (edits accumulate; the model stays edited), then measure every
        edit on the final model (locality against the model before its sequence started, as :meth:`edit_sequence`).
        """
        check_mode(self.hparams, "sequential", bool(self.stats_texts))
        self._start_sequence(requests)
        runs = []
        for request in requests:
            start = time.perf_counter()
            runs.append((request, self._edit_kept(request), time.perf_counter() - start))
        return [
            self._result(self.model, [r], [self._references[id(r)]], outcome, seconds) for r, outcome, seconds in runs
        ]

    def edit_sequence(
        self,
        requests: list[EditRequest],
        checkpoints: Sequence[int] = (),
        on_edit: Optional[Callable[[int, EditResult], None]] = None,
        on_checkpoint: Optional[Callable[[SequenceCheckpoint], None]] = None,
        seed: int = 0,
    ) -> list[SequenceCheckpoint]:
        """Sequential editing: apply ``requests[len(self.memory):]`` one after another to the same model (each
        merged before the next, or trained into the one shared adapter), measuring every edit so far after
        ``checkpoints`` edits (and after the last).

        Each edit ``i`` (0-based position in ``requests``) runs under ``torch.manual_seed(seed + i)``, so a run
        resumed with :meth:`load_state_dict` ends exactly where an uninterrupted one does. ``on_edit(i, result)``
        gets each edit's result measured right after it; ``on_checkpoint`` each checkpoint as it is measured.
        (:mod:`peft_roselora.editing.sequence` streams and saves such a run.)

        Raises:
            ValueError: a checkpoint outside ``[1, len(requests)]``, or ``requests`` that do not start with the
                edits already made (``self.memory``).
        """
        check_mode(self.hparams, "sequential", bool(self.stats_texts))
        total = len(requests)
        bad = [c for c in checkpoints if not 1 <= c <= total]
        if bad:
            raise ValueError(f"`checkpoints` must lie in [1, {total}] (the number of requests), got {bad}")
        done = len(self.memory)
        if [id(r) for r in requests[:done]] != [id(r) for r in self.memory] and requests[:done] != self.memory:
            raise ValueError(f"`requests` must start with the {done} edit(s) this editor already made")
        self._start_sequence(requests)
        marks = sorted(set(checkpoints) | {total})
        results = []
        for index in range(done, total):
            request = requests[index]
            torch.manual_seed(seed + index)
            start = time.perf_counter()
            outcome = self._edit_kept(request)
            self.seconds_editing += time.perf_counter() - start
            if on_edit is not None:
                on_edit(index, self._result(self.model, [request], [self._references[id(request)]], outcome, 0.0))
            if index + 1 in marks:
                checkpoint = self.checkpoint(requests[: index + 1])
                results.append(checkpoint)
                if on_checkpoint is not None:
                    on_checkpoint(checkpoint)
        return results

    def checkpoint(self, requests: list[EditRequest]) -> SequenceCheckpoint:
        """Every request of ``requests`` (edits made) measured on the current model."""
        self._record_references(requests)
        changed = editable = 0
        with torch.no_grad():
            for name, parameter in self.backend.editable_parameters().items():
                changed += int(torch.count_nonzero(parameter.detach().cpu() != self._unedited[name]))
                editable += parameter.numel()
        changed += self.backend.adapter_changed_weights()  # a shared adapter's delta (its base is untouched)
        scores = measure(self.model, self.tokenizer, requests, [self._references[id(r)] for r in requests])
        return SequenceCheckpoint(
            edits=len(requests),
            retention=scores.reliability,
            generalization=scores.generalization,
            locality=scores.locality,
            portability=scores.portability,
            changed_weights=changed,
            editable_weights=editable,
            total_weights=base_weight_count(self.model),
            seconds=self.seconds_editing,
        )

    # ---- resume ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming a sequence needs: the number of edits made (``edits_done``), the weights they changed
        (``weight.<name>``), and the backend's own state (AlphaEdit's ``K_p K_p^T`` as ``locate.*``; a shared
        adapter's factors, masks, schedule and optimizer as ``shared.*``). Tensors only (save with
        ``safetensors.torch.save_file``)."""
        self._remember_unedited()
        state = {"edits_done": torch.tensor(len(self.memory))}
        for name, parameter in self.backend.editable_parameters().items():
            state[f"weight.{name}"] = parameter.detach().cpu().contiguous()
        state.update(self.backend.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], requests: list[EditRequest]) -> int:
        """Resume a sequence of ``requests`` on this editor's unedited model: records the unedited predictions,
        restores the edited weights, the backend's state and the memory of the edits made; returns their number.

        Raises:
            ValueError: the state does not fit this model or method, or names more edits than ``requests`` holds.
        """
        done = int(state["edits_done"])
        if done > len(requests):
            raise ValueError(f"the state holds {done} edits, but only {len(requests)} requests were given")
        self._start_sequence(requests)
        parameters = self.backend.editable_parameters()
        expected = {f"weight.{name}" for name in parameters}
        given = {k for k in state if k.startswith("weight.")}
        if expected != given:
            raise ValueError(
                f"the state does not fit this model and method: unexpected weights {sorted(given - expected)[:3]}, "
                f"missing {sorted(expected - given)[:3]}"
            )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[f"weight.{name}"])
        # the backends keep what they load (EMAs, optimizer moments) and train it in place: copies, so that the
        # caller's tensors stay as given (the same state may resume two editors)
        self.backend.load_state_dict({key: value.clone() for key, value in state.items()}, done)
        self.memory = list(requests[:done])
        return done

    # ---- the sequence's own state ------------------------------------------------------------------------------

    def _edit_kept(self, request: EditRequest) -> EditOutcome:
        outcome = self.backend.edit([request], self.memory, keep=True)
        self.memory.append(request)
        return outcome

    def _start_sequence(self, requests: Sequence[EditRequest]) -> None:
        self._remember_unedited()
        self._record_references(requests)

    def _remember_unedited(self) -> None:
        self.objective.record_preservation_targets(self.model)
        if self._unedited is None:
            self._unedited = {name: p.detach().cpu().clone() for name, p in self.backend.editable_parameters().items()}

    def _record_references(self, requests: Sequence[EditRequest]) -> None:
        """The current model's locality predictions of each request not yet recorded (before its edit).

        Raises:
            ValueError: a request already edited whose predictions before its edit were not recorded.
        """
        missing = [r for r in requests if id(r) not in self._references]
        if any(r in self.memory for r in missing):
            raise ValueError("the unedited model's predictions of an edit already made were not recorded")
        for request in missing:
            self._references[id(request)] = locality_predictions(self.model, self.tokenizer, request)

    def _result(self, model, requests, references, outcome: EditOutcome, seconds: float) -> EditResult:
        scores = measure(model, self.tokenizer, requests, references)
        return EditResult(
            record_ids=[r.record_id for r in requests],
            reliability=scores.reliability,
            generalization=scores.generalization,
            locality=scores.locality,
            portability=scores.portability,
            steps=len(outcome.losses),
            first_loss=outcome.losses[0],
            last_loss=outcome.losses[-1],
            changed_weights=outcome.changed_weights,
            adapted_weights=outcome.adapted_weights,
            total_weights=base_weight_count(model),
            seconds=seconds,
            losses=outcome.losses,
        )
