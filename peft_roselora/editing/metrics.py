"""Knowledge-editing metrics as EasyEdit computes them: token-level, teacher-forced.

For a prompt and a target, the model reads ``prompt + " " + target`` and predicts every target token from the
tokens before it; reliability (edit prompt), generalisation (rephrased prompts) and portability are the fraction of
target tokens predicted correctly. Locality runs the same on unrelated prompts with their answers and is the fraction
of those predicted tokens that the edit left unchanged.
"""

from __future__ import annotations

import torch


def token_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of positions where ``predicted`` equals ``target`` (1-D token ids of equal length).

    Raises:
        ValueError: if the shapes differ or are empty.
    """
    if predicted.shape != target.shape or predicted.numel() == 0:
        raise ValueError(
            f"`predicted` and `target` must be non-empty and of one shape, got {tuple(predicted.shape)} "
            f"and {tuple(target.shape)}"
        )
    return (predicted == target).float().mean().item()


def unchanged_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of predicted tokens that did not change (locality); same contract as :func:`token_accuracy`."""
    return token_accuracy(after, before)


def encode_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's special tokens at the start, none at the end) and of the target
    with a space prepended, as the authors' recipe trains and evaluates it."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if prompt_ids and prompt_ids[-1] == getattr(tokenizer, "sep_token_id", None):
        prompt_ids = prompt_ids[:-1]  # WordPiece tokenizers close with [SEP]: the target continues the prompt
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return prompt_ids, target_ids


def right_padded(sequences: list[list[int]], value: int, device=None) -> torch.Tensor:
    """``sequences`` as one ``(n, T)`` tensor, each row right-padded with ``value`` to the longest length ``T``."""
    width = max(len(ids) for ids in sequences)
    return torch.tensor([list(ids) + [value] * (width - len(ids)) for ids in sequences], device=device)


def padded_batch(tokenizer, sequences: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids ``(n, T)`` (the tokenizer's pad id, 0 without one) and their attention mask."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mask = right_padded([[1] * len(ids) for ids in sequences], 0, device)
    return right_padded(sequences, pad, device), mask


@torch.no_grad()
def predicted_target_tokens(model, tokenizer, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced predictions for the target tokens: ``(predicted ids, target ids)``, both 1-D."""
    prompt_ids, target_ids = encode_prompt_target(tokenizer, prompt, target)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + target_ids], device=device)
    logits = model(input_ids=input_ids).logits[0]
    start = len(prompt_ids) - 1
    predicted = logits[start : start + len(target_ids)].argmax(dim=-1).cpu()
    return predicted, torch.tensor(target_ids)


def accuracy(model, tokenizer, prompts: list[str], targets: list[str]) -> float | None:
    """Mean teacher-forced token accuracy over prompt/target pairs (None when there are none)."""
    if not prompts:
        return None
    scores = [token_accuracy(*predicted_target_tokens(model, tokenizer, p, t)) for p, t in zip(prompts, targets)]
    return sum(scores) / len(scores)


def locality_predictions(model, tokenizer, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """The model's predicted tokens on each locality prompt + answer (compare before and after an edit)."""
    return [predicted_target_tokens(model, tokenizer, p, a)[0] for p, a in zip(prompts, answers)]


def locality(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """Mean fraction of locality tokens whose prediction the edit left unchanged (None when there are none)."""
    if not before:
        return None
    return sum(unchanged_fraction(b, a) for b, a in zip(before, after)) / len(before)
