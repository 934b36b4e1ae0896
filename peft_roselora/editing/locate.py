"""Locate-then-edit baselines written from the papers: MEMIT and AlphaEdit, for causal LMs with Llama-style MLPs.

MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023) treats the down projection ``W`` (shape
``(d_model, d_ff)``) of the MLPs of a few consecutive decoder layers as a linear key-value memory: the key ``k`` is
the MLP's hidden activation (the input of ``down_proj``) at the subject's last token, the value is ``W k``. An edit
of ``n`` facts:

1. finds, per fact, the hidden state ``z*`` (shape ``(d_model,)``) that the last edited layer must output at the
   subject's last token for the model to predict the new target: the current output plus a vector optimised by Adam
   on the target's negative log-likelihood, a KL term that keeps the model's view of the subject
   (``"{subject} is a"``), and a norm penalty, with the vector's norm clamped (:func:`target_hidden_states`);
2. for each edited layer ``l`` in order: keys ``K`` (``(d_ff, n)``, current weights), the residual
   ``R = (Z* - Z) / (layers left)`` (``(d_model, n)``; ``Z`` the current output of the last edited layer), and adds
   the least-squares update that writes ``R`` at ``K`` while keeping the values of the keys the model already uses:

   - MEMIT: ``Delta = R K^T (lambda C + K K^T)^{-1}`` (:func:`memit_update`),
   - AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025):
     ``Delta = R K^T P ((K_p K_p^T + K K^T) P + alpha I)^{-1}`` (:func:`alphaedit_update`), where ``P`` projects
     onto the null space of ``C`` (:func:`null_space_projector`), so ``Delta k_0 = 0`` for every preserved key, and
     ``K_p K_p^T`` accumulates the keys of earlier edits (sequential editing).

``C = E[k k^T]`` (``(d_ff, d_ff)``) is the second moment of the keys over every token of a text sample the user
gives (:func:`key_statistics`; the papers use Wikipedia, the benchmark model's own training text here).

``fact_token="last"`` reads keys and writes targets at the prompt's last token instead of the subject's (an option
of the papers' code: on the small benchmark model the subject's last token carries too little of the answer).

Written from the papers, not from their code. Differences, all stated: no random context prefixes (the papers
average keys and targets over ten model-generated prefixes; here the prompt itself is used); the subject's last token
is found with the tokenizer's character offsets (the prompt's last token when the request has no subject or the
tokenizer gives no offsets); one target vector per fact, optimised jointly for a batch (the losses are independent,
Adam is element-wise: the same as one at a time, except that the early stop waits for every fact).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import metrics
from .data import EditRequest


EARLY_STOP_NLL = 5e-2  # MEMIT stops optimising the target vector once the target's mean NLL is below this


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.get_decoder().layers``).

    Raises:
        ValueError: the model has no decoder layers with an ``mlp.down_proj`` linear layer (Llama-style MLP).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(
        isinstance(getattr(getattr(layer, "mlp", None), "down_proj", None), torch.nn.Linear) for layer in layers
    ):
        raise ValueError(
            f"MEMIT / AlphaEdit need a causal LM whose decoder layers have a Llama-style MLP with a `down_proj` "
            f"torch.nn.Linear (model.get_decoder().layers[i].mlp.down_proj); {type(model).__name__} has none"
        )
    return layers


def default_edit_layers(num_layers: int) -> tuple[int, ...]:
    """The papers' choice scaled to the depth: consecutive layers from 15 % to 30 % of the depth (Llama-3-8B, 32
    layers: 5..10; AlphaEdit uses 4..8), at least one layer, and never the last layer (the target hidden state at the
    subject must reach the later tokens through the attention of a later layer).

    Raises:
        ValueError: ``num_layers`` < 2.
    """
    if num_layers < 2:
        raise ValueError(f"MEMIT / AlphaEdit need a model with at least 2 decoder layers, got {num_layers}")
    last = max(0, min(num_layers - 2, round(0.3 * num_layers)))
    first = min(last, round(0.15 * num_layers))
    return tuple(range(first, last + 1))


def subject_last_token(tokenizer, prompt: str, subject: Optional[str]) -> int:
    """Index, in the prompt's token ids as :func:`metrics.encode_prompt_target` builds them, of the subject's last
    token; the prompt's last token when there is no subject, it does not occur, or the tokenizer gives no offsets."""
    prompt_ids, _ = metrics.encode_prompt_target(tokenizer, prompt, "x")
    last = len(prompt_ids) - 1
    start = prompt.find(subject) if subject else -1
    if start < 0 or not getattr(tokenizer, "is_fast", False):
        return last
    end = start + len(subject)
    offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"][: last + 1]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return inside[-1] if inside else last


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def key_statistics(model, tokenizer, texts: Sequence[str], layers: Sequence[int], batch_size: int = 32) -> dict:
    """``C_l = E[k k^T]`` over every (non-padding) token of ``texts``: the second moment of the input of
    ``layers[l].mlp.down_proj``, per edited layer, in float64, shape ``(d_ff, d_ff)``.

    Raises:
        ValueError: ``texts`` is empty.
    """
    if not texts:
        raise ValueError("`texts` (the key-statistics text sample) must hold at least one text, got none")
    modules = decoder_layers(model)
    device = next(model.parameters()).device
    sums = {layer: None for layer in layers}
    count = 0
    captured = {}
    hooks = [
        modules[layer].mlp.down_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(layer, args[0])
        )
        for layer in layers
    ]
    try:
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts[start : start + batch_size]]
            input_ids, mask = metrics.padded_batch(tokenizer, encoded, device)
            model(input_ids=input_ids, attention_mask=mask)
            keep = mask.bool()
            count += int(keep.sum())
            for layer in layers:
                keys = captured[layer][keep].double()  # (tokens, d_ff)
                gram = keys.T @ keys
                sums[layer] = gram if sums[layer] is None else sums[layer] + gram
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: total / count for layer, total in sums.items()}


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projector ``P = U_0 U_0^T`` onto the span of the eigenvectors of ``second_moment`` (``(d, d)``,
    symmetric) whose eigenvalues are below ``threshold``: ``P k = 0`` for keys in the preserved directions.

    Raises:
        ValueError: ``threshold`` is not > 0.
    """
    if not threshold > 0:
        raise ValueError(f"`nullspace_threshold` must be > 0, got {threshold}")
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    basis = eigenvectors[:, eigenvalues < threshold]
    return basis @ basis.T


def memit_update(
    residual: torch.Tensor, keys: torch.Tensor, second_moment: torch.Tensor, weight: float
) -> torch.Tensor:
    """MEMIT's update ``R K^T (weight * C + K K^T)^{-1}``: the ``Delta`` (``(d_model, d_ff)``) minimising
    ``||Delta K - R||^2 + weight * tr(Delta C Delta^T)``. ``residual`` ``(d_model, n)``, ``keys`` ``(d_ff, n)``,
    ``second_moment`` ``(d_ff, d_ff)``; computed in float64."""
    keys, residual = keys.double(), residual.double()
    adjusted = torch.linalg.solve(weight * second_moment.double() + keys @ keys.T, keys)  # (d_ff, n)
    return residual @ adjusted.T


def alphaedit_update(
    residual: torch.Tensor, keys: torch.Tensor, projector: torch.Tensor, previous_gram: torch.Tensor, l2: float
) -> torch.Tensor:
    """AlphaEdit's update ``R K^T P ((K_p K_p^T + K K^T) P + l2 I)^{-1}`` (``(d_model, d_ff)``): its rows lie in the
    range of ``P`` (``Delta = Delta P``), so ``Delta k_0 = 0`` for keys ``k_0`` with ``P k_0 = 0``. ``residual``
    ``(d_model, n)``, ``keys`` ``(d_ff, n)``, ``projector`` and ``previous_gram`` (``K_p K_p^T`` of earlier edits)
    ``(d_ff, d_ff)``; computed in float64."""
    keys, residual, projector = keys.double(), residual.double(), projector.double()
    system = projector @ (previous_gram.double() + keys @ keys.T) + l2 * torch.eye(
        len(projector), dtype=torch.float64, device=keys.device
    )
    return torch.linalg.solve(system, projector @ keys @ residual.T).T


class _Encoded:
    """Requests as right-padded ``prompt + target`` ids, with the subject's last token and the target positions."""

    def __init__(self, tokenizer, requests: list[EditRequest], device, fact_token: str = "subject_last") -> None:
        sequences, self.subject, prompt_lengths = [], [], []
        for request in requests:
            prompt_ids, target_ids = metrics.encode_prompt_target(tokenizer, request.prompt, request.target_new)
            sequences.append(prompt_ids + target_ids)
            subject = request.subject if fact_token == "subject_last" else None
            self.subject.append(subject_last_token(tokenizer, request.prompt, subject))
            prompt_lengths.append(len(prompt_ids))
        self.input_ids, self.mask = metrics.padded_batch(tokenizer, sequences, device)
        # labels[i, t]: the token position t predicts (t + 1), on target tokens only; -100 elsewhere
        self.labels = metrics.right_padded(
            [[-100] * (start - 1) + ids[start:] + [-100] for ids, start in zip(sequences, prompt_lengths)],
            -100,
            device,
        )
        self.rows = torch.arange(len(requests), device=device)
        self.subject = torch.tensor(self.subject, device=device)


class LocateThenEdit:
    """MEMIT (``null_space=False``) or AlphaEdit (``null_space=True``) on one model: holds the key statistics,
    AlphaEdit's projectors and its ``K_p K_p^T`` of earlier edits (``state_dict`` / ``load_state_dict``).

    Args:
        model: a causal LM with Llama-style MLPs (see :func:`decoder_layers`); edited in place.
        tokenizer: its tokenizer.
        name: the method's name (for messages).
        hparams: the editor's :class:`~peft_roselora.editing.EditHyperParams` (``edit_layers``, ``v_lr``,
            ``v_steps``, ``v_weight_decay``, ``kl_factor``, ``clamp_norm_factor``, ``mom2_weight``,
            ``nullspace_threshold``, ``l2``).
        stats_texts: the text sample for the key statistics.
        null_space: AlphaEdit's update (projected onto the null space of the preserved keys, remembering the keys
            of earlier edits) instead of MEMIT's.

    Raises:
        ValueError: no text sample, a layer index out of range, or a model without Llama-style MLPs.
    """

    def __init__(
        self, model, tokenizer, name: str, hparams, stats_texts: Optional[Sequence[str]], null_space: bool
    ) -> None:
        if not stats_texts:
            raise ValueError(
                f"method {name!r} needs `stats_texts`: a sample of text the model has seen (its training text, or "
                f"text like it) for the key statistics; got {stats_texts!r}"
            )
        self.null_space, self.hparams, self.tokenizer = null_space, hparams, tokenizer
        num_layers = len(decoder_layers(model))
        self.layers = (
            tuple(hparams.edit_layers) if hparams.edit_layers is not None else default_edit_layers(num_layers)
        )
        bad = [layer for layer in self.layers if not 0 <= layer < num_layers - 1]
        if bad or not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(
                f"`edit_layers` must be increasing layer indices in [0, {num_layers - 2}] (the last layer "
                f"cannot carry the edit to the target tokens), got {self.layers}"
            )
        self.second_moment = key_statistics(model, tokenizer, list(stats_texts), self.layers)
        self.projector = (
            {layer: null_space_projector(c, hparams.nullspace_threshold) for layer, c in self.second_moment.items()}
            if null_space
            else {}
        )
        self.previous_gram = {layer: torch.zeros_like(c) for layer, c in self.second_moment.items()}

    # ---- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AlphaEdit's accumulated ``K_p K_p^T`` per layer (the rest is recomputed from the text sample)."""
        return {f"previous_gram.{layer}": g for layer, g in self.previous_gram.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for layer in self.layers:
            self.previous_gram[layer] = state[f"previous_gram.{layer}"].to(self.previous_gram[layer])

    def null_space_dims(self) -> dict[int, int]:
        """Rank of AlphaEdit's projector per edited layer (0 for MEMIT)."""
        return {layer: int(round(float(torch.trace(p)))) for layer, p in self.projector.items()}

    def weights(self, model) -> dict[int, torch.nn.Parameter]:
        """The edited ``down_proj`` weights per layer."""
        modules = decoder_layers(model)
        return {layer: modules[layer].mlp.down_proj.weight for layer in self.layers}

    # ---- editing ---------------------------------------------------------------------------------------------------

    def _capture(self, model, encoded: _Encoded, key_layer: Optional[int]):
        """At the subjects: keys at `key_layer` `(d_ff, n)` (or None), last edited layer's output `(d_model, n)`."""
        modules, captured = decoder_layers(model), {}
        hooks = [
            modules[self.layers[-1]].register_forward_hook(
                lambda m, a, out: captured.__setitem__("z", _output_tensor(out))
            )
        ]
        if key_layer is not None:
            hooks.append(
                modules[key_layer].mlp.down_proj.register_forward_pre_hook(
                    lambda m, args: captured.__setitem__("k", args[0])
                )
            )
        try:
            with torch.no_grad():
                model(input_ids=encoded.input_ids, attention_mask=encoded.mask)
        finally:
            for hook in hooks:
                hook.remove()
        at = (encoded.rows, encoded.subject)
        keys = captured["k"][at].T if key_layer is not None else None
        return keys, captured["z"][at].T

    def target_hidden_states(self, model, requests: list[EditRequest]) -> tuple[torch.Tensor, list[float]]:
        """``Z*`` (``(d_model, n)``): per request, the last edited layer's output at the subject's last token plus the
        optimised vector (see the module docstring); also the mean target NLL per optimisation step."""
        h = self.hparams
        device = next(model.parameters()).device
        encoded = _Encoded(self.tokenizer, requests, device, h.fact_token)
        _, initial = self._capture(model, encoded, None)
        initial = initial.T  # (n, d_model)
        subjects = [r.subject for r in requests]
        kl_rows = [i for i, s in enumerate(subjects) if s]
        kl_encoded = None
        if kl_rows and h.kl_factor > 0:
            kl_ids = [self.tokenizer(f"{subjects[i]} is a", add_special_tokens=True)["input_ids"] for i in kl_rows]
            kl_ids = [
                ids[:-1] if ids and ids[-1] == getattr(self.tokenizer, "sep_token_id", None) else ids for ids in kl_ids
            ]
            kl_input, kl_mask = metrics.padded_batch(self.tokenizer, kl_ids, device)
            kl_subject = torch.tensor(
                [subject_last_token(self.tokenizer, f"{subjects[i]} is a", subjects[i]) for i in kl_rows],
                device=device,
            )
            kl_last = kl_mask.sum(dim=1) - 1
            kl_encoded = (kl_input, kl_mask, torch.tensor(kl_rows, device=device), kl_subject, kl_last)

        delta = torch.zeros_like(initial, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=h.v_lr)
        layer_module = decoder_layers(model)[self.layers[-1]]
        state = {}

        def add_delta(module, args, output):
            hidden = _output_tensor(output)
            rows, positions, which = state["where"]
            hidden = hidden.clone()
            hidden[rows, positions] = hidden[rows, positions] + delta[which]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        hook = layer_module.register_forward_hook(add_delta)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        for parameter in trainable:  # only the vector is optimised; the flags are restored below
            parameter.requires_grad_(False)
        max_norm = h.clamp_norm_factor * initial.norm(dim=1, keepdim=True)
        losses, kl_reference = [], None
        try:
            for _ in range(h.v_steps):
                state["where"] = (encoded.rows, encoded.subject, encoded.rows)
                logits = model(input_ids=encoded.input_ids, attention_mask=encoded.mask).logits
                per_token = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), encoded.labels, ignore_index=-100, reduction="none"
                )  # (n, T)
                nll = per_token.sum(dim=1) / (encoded.labels != -100).sum(dim=1)  # mean NLL per request
                loss = nll.sum()
                if kl_encoded is not None:
                    kl_input, kl_mask, kl_which, kl_subject, kl_last = kl_encoded
                    state["where"] = (torch.arange(len(kl_which), device=device), kl_subject, kl_which)
                    kl_logits = model(input_ids=kl_input, attention_mask=kl_mask).logits
                    kl_log_probs = torch.log_softmax(kl_logits[torch.arange(len(kl_which)), kl_last].float(), dim=-1)
                    if kl_reference is None:
                        kl_reference = kl_log_probs.detach()
                    kl = torch.nn.functional.kl_div(kl_log_probs, kl_reference, log_target=True, reduction="sum")
                    loss = loss + h.kl_factor * kl
                decay = h.v_weight_decay * (delta.norm(dim=1) / initial.norm(dim=1) ** 2).sum()
                losses.append(float(nll.detach().mean()))
                if float(nll.detach().max()) < EARLY_STOP_NLL:
                    break
                optimizer.zero_grad()
                (loss + decay).backward()
                optimizer.step()
                with torch.no_grad():  # keep |delta| <= clamp_norm_factor * |h|
                    norms = delta.norm(dim=1, keepdim=True)
                    delta.mul_(
                        torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    )
        finally:
            hook.remove()
            for parameter in trainable:
                parameter.requires_grad_(True)
        return (initial + delta.detach()).T, losses

    def edit(self, model, requests: list[EditRequest], remember: bool) -> list[float]:
        """Write ``requests`` into ``model``'s edited ``down_proj`` weights (in place); with ``remember`` (sequential
        editing) AlphaEdit adds the new keys to ``K_p K_p^T``. Returns the target-vector optimisation's mean NLL per
        step."""
        targets, losses = self.target_hidden_states(model, requests)
        encoded = _Encoded(self.tokenizer, requests, targets.device, self.hparams.fact_token)
        weights = self.weights(model)
        for index, layer in enumerate(self.layers):
            keys, current = self._capture(model, encoded, layer)
            residual = (targets - current) / (len(self.layers) - index)
            if self.null_space:
                update = alphaedit_update(
                    residual, keys, self.projector[layer], self.previous_gram[layer], self.hparams.l2
                )
            else:
                update = memit_update(residual, keys, self.second_moment[layer], self.hparams.mom2_weight)
            with torch.no_grad():
                weights[layer].add_(update.to(weights[layer].dtype))
        if remember and self.null_space:
            for layer in self.layers:
                keys, _ = self._capture(model, encoded, layer)
                self.previous_gram[layer] += keys.double() @ keys.double().T
        return losses
