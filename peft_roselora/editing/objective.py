"""The edit objective every gradient method trains: the target loss of the requests, the many-edit mode's replay of
earlier edits and preservation of the unedited model's predictions, and the "does the edit hold" check of
``hold_steps``. Pure functions of tensors plus :class:`EditObjective`, which owns what they read (the tokenized
requests, the preservation targets).
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch

from . import metrics
from .data import EditRequest


LossFunction = Callable[[torch.nn.Module], torch.Tensor]


def padded_examples(tokenizer, pairs: Sequence[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + target`` ids ``(n, T)`` of encoded ``(prompt ids, target ids)`` pairs, attention mask
    ``(n, T)`` and labels ``(n, T)`` (``-100`` outside the targets)."""
    input_ids, mask = metrics.padded_batch(tokenizer, [p + t for p, t in pairs], device)
    labels = metrics.right_padded([[-100] * len(p) + t for p, t in pairs], -100, device)
    return input_ids, mask, labels


def request_losses(model, examples) -> torch.Tensor:
    """Each request's mean cross-entropy on its target tokens, shape ``(n,)`` (one padded forward pass)."""
    input_ids, mask, labels = examples
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    shifted = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    counts = (shifted != -100).sum(dim=1)
    return per_token.sum(dim=1) / counts


def target_loss(model, examples) -> torch.Tensor:
    """Mean over requests of each request's mean cross-entropy on its target tokens (a scalar)."""
    return request_losses(model, examples).mean()


@torch.no_grad()
def requests_held(model, examples) -> torch.Tensor:
    """Whether the model predicts every target token of each request (teacher-forced argmax, the reliability
    metric's test), shape ``(n,)`` bool; one padded forward pass in the model's current mode."""
    input_ids, mask, labels = examples
    predicted = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    shifted = labels[:, 1:]
    return ((predicted == shifted) | (shifted == -100)).all(dim=1)


def replay_picks(total: int, count: int, losses: Optional[torch.Tensor] = None, priority: float = 0.0) -> list[int]:
    """Indices (into the ``total`` earlier edits) of the ``min(count, total)`` edits one step replays:
    ``round(priority * count)`` of them drawn without replacement with probability proportional to ``losses`` (each
    earlier edit's target loss; zero losses are drawn last), the rest uniformly from the edits not drawn yet. With
    ``priority == 0`` this is ``torch.randperm(total)[:count]``. Uses torch's global generator (the editor seeds it
    per edit, so a resumed sequence draws the same).

    Args:
        total: the number of earlier edits, ``>= 0``.
        count: how many to replay, ``>= 0``.
        losses: shape ``(total,)``, finite and non-negative; needed when ``priority > 0``.
        priority: the fraction of the sample drawn by loss, in ``[0, 1]``.

    Raises:
        ValueError: ``priority`` outside ``[0, 1]``; ``priority > 0`` without ``losses``, or ``losses`` of another
            shape, negative or not finite.
    """
    if not 0 <= priority <= 1:
        raise ValueError(f"`priority` must be in [0, 1], got {priority}")
    count = min(count, total)
    if priority == 0:
        return torch.randperm(total)[:count].tolist()
    if losses is None or losses.shape != (total,):
        shape = None if losses is None else tuple(losses.shape)
        raise ValueError(f"`losses` must have shape ({total},) when `priority` > 0, got {shape}")
    if not bool(torch.isfinite(losses).all()) or bool((losses < 0).any()):
        raise ValueError("`losses` must be finite and >= 0 (a NaN or negative earlier-edit loss)")
    by_loss = round(priority * count)
    weights = losses.detach().double().cpu() + 1e-12  # all-zero losses: uniform
    drawn = torch.multinomial(weights, by_loss, replacement=False) if by_loss else torch.empty(0, dtype=torch.long)
    rest = torch.ones(total, dtype=torch.bool)
    rest[drawn] = False
    others = rest.nonzero().squeeze(1)
    uniform = others[torch.randperm(len(others))[: count - by_loss]]
    return drawn.tolist() + uniform.tolist()


class EditObjective:
    """The loss an edit trains and its hold check, for one editor.

    Owns the tokenized requests (each tokenized once: replay reads the same requests every step) and the
    preservation targets (the unedited model's next-token predictions on every text of the text sample, recorded
    once before the first edit).

    Args:
        tokenizer: the model's tokenizer.
        hparams: ``replay``, ``replay_priority``, ``replay_score_limit``, ``preserve_weight``, ``preserve_batch``,
            ``preserve_tokens``, ``many_edit_every``, ``hold_steps`` are read.
        stats_texts: the text sample (needed when ``preserve_weight > 0``).
        device: where the examples are built.
    """

    def __init__(self, tokenizer, hparams, stats_texts: Optional[list[str]], device) -> None:
        self.tokenizer, self.hparams, self.stats_texts, self.device = tokenizer, hparams, stats_texts, device
        self._encodings: dict[int, tuple[list[int], list[int]]] = {}  # request id -> (prompt ids, target ids)
        self.preservation_targets: Optional[list[tuple[list[int], list[int]]]] = None  # (text ids, predictions)

    def encoded(self, request: EditRequest) -> tuple[list[int], list[int]]:
        """``(prompt ids, target ids)`` of a request, tokenized once."""
        if id(request) not in self._encodings:
            self._encodings[id(request)] = metrics.encode_prompt_target(
                self.tokenizer, request.prompt, request.target_new
            )
        return self._encodings[id(request)]

    def examples(self, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, ...]:
        """:func:`padded_examples` of the requests."""
        return padded_examples(self.tokenizer, [self.encoded(r) for r in requests], self.device)

    @torch.no_grad()
    def record_preservation_targets(self, unedited_model) -> None:
        """The unedited model's next-token predictions on every text of the sample (once; without
        ``preserve_weight`` nothing)."""
        if self.preservation_targets is not None or self.hparams.preserve_weight == 0:
            return
        self.preservation_targets = []
        for start in range(0, len(self.stats_texts), 32):
            texts = self.stats_texts[start : start + 32]
            encoded = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
            input_ids, mask = metrics.padded_batch(self.tokenizer, encoded, self.device)
            predicted = unedited_model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
            for row in range(len(input_ids)):
                length = int(mask[row].sum())
                if length < 2:  # nothing to predict
                    continue
                self.preservation_targets.append(
                    (input_ids[row, :length].tolist(), predicted[row, : length - 1].tolist())
                )

    @torch.no_grad()
    def memory_losses(self, model, memory: Sequence[EditRequest], batch_size: int = 64) -> torch.Tensor:
        """Each earlier edit's target loss under ``model`` (eval mode), shape ``(len(memory),)``."""
        training = model.training
        model.eval()
        losses = [
            request_losses(model, self.examples(memory[start : start + batch_size]))
            for start in range(0, len(memory), batch_size)
        ]
        model.train(training)
        return torch.cat(losses).cpu()

    def replay_priorities(self, model, memory: Sequence[EditRequest]) -> Optional[torch.Tensor]:
        """The losses :func:`replay_picks` draws the prioritised replays by, shape ``(len(memory),)``: each earlier
        edit's target loss under ``model`` as the edit starts; with ``replay_score_limit`` below ``len(memory)``,
        only that many earlier edits (a uniform draw from torch's global generator) are scored and the others get
        loss 0 (drawn by loss last). None when the edit has no prioritised replay."""
        h = self.hparams
        if not (h.replay and h.replay_priority > 0 and memory):
            return None
        if h.replay_score_limit is None or h.replay_score_limit >= len(memory):
            return self.memory_losses(model, memory)
        scored = torch.randperm(len(memory))[: h.replay_score_limit]
        losses = torch.zeros(len(memory))
        losses[scored] = self.memory_losses(model, [memory[i] for i in scored.tolist()]).to(losses.dtype)
        return losses

    def loss_for(self, model, requests: Sequence[EditRequest], memory: Sequence[EditRequest]) -> LossFunction:
        """The step's loss function of an edit of ``requests`` on ``model`` after the edits ``memory``: the requests'
        target loss, plus (many-edit mode) ``replay`` earlier edits (a fresh draw of :func:`replay_picks` every
        step; with ``replay_priority``, weighted by :meth:`replay_priorities`) and
        ``preserve_weight`` times the cross-entropy to the preservation targets of ``preserve_batch`` texts (their
        first ``preserve_tokens`` tokens).

        The requests, the replayed edits and the preservation texts of a step share one padded forward pass (rows
        of one batch, each row's mean cross-entropy on its own labels): the many-edit mode costs one forward and
        one backward per step like a single edit, on a wider batch. With ``many_edit_every`` = k, only every k-th
        call (the first included) has the replayed edits and the preservation texts, weighted so that the k steps
        together weigh the requests, the replayed edits and the preservation as k steps with k = 1 do (up to one
        scale, ``edits / requests``); the other calls are the requests' target loss alone (what ``early_stop_loss``
        then reads)."""
        h = self.hparams
        examples = self.examples(requests)
        self.record_preservation_targets(model)
        priorities = self.replay_priorities(model, memory)
        if not (h.replay and memory) and h.preserve_weight == 0:
            return lambda trained: target_loss(trained, examples)
        edited = [self._labelled(self.encoded(r)) for r in requests]
        steps = itertools.count()

        def loss_of(trained) -> torch.Tensor:
            if next(steps) % h.many_edit_every:  # a step of the edit alone
                return target_loss(trained, examples)
            rows, replayed, preserved = list(edited), 0, 0
            if h.replay and memory:
                picks = replay_picks(len(memory), h.replay, priorities, h.replay_priority)
                rows += [self._labelled(self.encoded(memory[i])) for i in picks]
                replayed = len(picks)
            if h.preserve_weight > 0:
                picks = torch.randint(len(self.preservation_targets), (h.preserve_batch,)).tolist()
                rows += [self._preserved(*self.preservation_targets[i], h.preserve_tokens) for i in picks]
                preserved = len(picks)
            input_ids, mask = metrics.padded_batch(self.tokenizer, [ids for ids, _ in rows], self.device)
            labels = metrics.right_padded([row_labels for _, row_labels in rows], -100, self.device)
            losses = request_losses(trained, (input_ids, mask, labels))
            edits, every = len(requests) + replayed, h.many_edit_every
            if every == 1:
                loss = losses[:edits].mean()  # the requests and the replayed edits, each counted once
                return loss + h.preserve_weight * losses[edits:].mean() if preserved else loss
            # k = every: this step and the k - 1 steps of the requests alone (their target loss) weigh the requests,
            # the replayed edits and the preservation as k steps with every = 1 do, scaled by edits / requests
            loss = (losses[: len(requests)].sum() + every * losses[len(requests) : edits].sum()) / len(requests)
            if preserved:
                loss = loss + every * h.preserve_weight * edits / len(requests) * losses[edits:].mean()
            return loss

        return loss_of

    @staticmethod
    def _preserved(ids: list[int], predicted: list[int], tokens: Optional[int]) -> tuple[list[int], list[int]]:
        """``(text ids, labels)`` of a preservation text: label ``t`` is the unedited model's prediction after token
        ``t - 1`` (-100 at 0); with ``tokens``, the first ``tokens`` of them (a causal model's predictions on a prefix
        are its predictions on the whole text)."""
        ids, predicted = (ids, predicted) if tokens is None else (ids[:tokens], predicted[: tokens - 1])
        return ids, [-100] + list(predicted)

    @staticmethod
    def _labelled(encoded: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        """``(prompt + target ids, labels)`` of an encoded request: the labels are the target ids, -100 before."""
        prompt, target = encoded
        return prompt + target, [-100] * len(prompt) + target

    def held_check(self, requests: Sequence[EditRequest]) -> Optional[Callable[[torch.nn.Module], bool]]:
        """``hold_steps``: a function telling whether a model (put in eval mode for the check) holds every request;
        None without ``hold_steps``."""
        if not self.hparams.hold_steps:
            return None
        examples = self.examples(requests)

        def held(model) -> bool:
            training = model.training
            model.eval()
            verdict = bool(requests_held(model, examples).all())
            model.train(training)
            return verdict

        return held
