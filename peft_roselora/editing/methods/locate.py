"""MEMIT and AlphaEdit as editing backends (the math and the target vectors: :mod:`peft_roselora.editing.locate`)."""

from __future__ import annotations

import torch

from ..locate import LocateThenEdit
from .base import EditBackend, EditOutcome


class LocateBackend(EditBackend):
    """A locate-then-edit method: one closed-form update of the ``down_proj`` weights of ``edit_layers`` per edit,
    from key statistics of the text sample (required)."""

    needs_stats_texts = True
    null_space: bool  # AlphaEdit's projected update (True) or MEMIT's (False)

    def __init__(self, model, tokenizer, hparams, objective, stats_texts) -> None:
        super().__init__(model, tokenizer, hparams, objective, stats_texts)
        self.locate = LocateThenEdit(model, tokenizer, self.name, hparams, stats_texts, self.null_space)

    def editable_parameters(self) -> dict[str, torch.nn.Parameter]:
        weights = {id(w) for w in self.locate.weights(self.base).values()}
        return {name: p for name, p in self.base.named_parameters() if id(p) in weights}

    def edit(self, requests, memory, keep) -> EditOutcome:
        weights = self.locate.weights(self.base)
        originals = {layer: w.detach().clone() for layer, w in weights.items()}
        losses = self.locate.edit(self.base, list(requests), remember=keep)
        with torch.no_grad():
            changed = sum(int(torch.count_nonzero(w - originals[layer])) for layer, w in weights.items())

        def restore():
            with torch.no_grad():
                for layer, w in weights.items():
                    w.copy_(originals[layer])

        adapted = sum(w.numel() for w in weights.values())
        return EditOutcome(self.base, losses, changed, adapted, None if keep else restore)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AlphaEdit's ``K_p K_p^T`` of the edits made (``locate.*``; MEMIT: nothing)."""
        return {f"locate.{k}": v.contiguous() for k, v in self.locate.state_dict().items()}

    def load_state_dict(self, state, edits_done) -> None:
        super().load_state_dict(state, edits_done)
        self.locate.load_state_dict({k[len("locate.") :]: v for k, v in state.items() if k.startswith("locate.")})


class MemitBackend(LocateBackend):
    """MEMIT (Meng et al. 2023)."""

    name = "memit"
    null_space = False


class AlphaEditBackend(LocateBackend):
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved keys."""

    name = "alphaedit"
    null_space = True
