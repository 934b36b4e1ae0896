"""Knowledge editing with RoseLoRA (the authors' recipe) and the baselines LoRA, AdaLoRA and FT-L.

``Editor.edit_single`` starts every edit from the unedited model (fresh adapter, fresh importance), trains on the
target tokens only, and reports the metrics of ``metrics.py`` together with how many base weights the edit changed.
``edit_batch`` writes several facts with one adapter; ``edit_sequential`` merges each edit before the next one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

from ..config import RoseLoraConfig
from ..training import get_roselora_model
from . import metrics
from .data import EditRequest


METHODS = ("roselora", "lora", "adalora", "ft-l")


@dataclass
class EditHyperParams:
    """Defaults: the authors' RoseLoRA editing recipe (docs/method.md, docs/editing.md); the baselines share steps,
    rank, lr, targets.

    ``ft_layer`` (FT-L): index of the decoder layer whose MLP down projection is fine-tuned (default: the middle
    layer); ``ft_norm``: its L-infinity bound on the weight change.
    """

    method: Literal["roselora", "lora", "adalora", "ft-l"] = "roselora"
    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 5e-4
    steps: int = 25
    keep_ratio: float = 0.05
    prune_start_step: int = 3
    prune_end_step: int = 20
    clamp_value: Optional[float] = 3e-3
    early_stop_loss: float = 0.1
    ft_layer: Optional[int] = None
    ft_norm: float = 5e-4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if not 0 <= self.prune_start_step < self.prune_end_step <= self.steps:
            raise ValueError(
                f"the schedule must satisfy 0 <= prune_start_step < prune_end_step <= steps, got "
                f"prune_start_step={self.prune_start_step}, prune_end_step={self.prune_end_step}, steps={self.steps}"
            )

    @classmethod
    def scaled_to(cls, steps: int, **kwargs) -> EditHyperParams:
        """The recipe with ``steps`` optimizer steps and its schedule scaled in proportion (3/25 dense, final keep
        ratio at 20/25 of the steps)."""
        start = round(steps * 3 / 25)
        end = min(steps, max(start + 1, round(steps * 20 / 25)))
        return cls(steps=steps, prune_start_step=start, prune_end_step=end, **kwargs)


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


def _example(tokenizer, request: EditRequest, device) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_ids, target_ids = metrics.encode_prompt_target(tokenizer, request.prompt, request.target_new)
    input_ids = torch.tensor([prompt_ids + target_ids], device=device)
    labels = torch.tensor([[-100] * len(prompt_ids) + target_ids], device=device)
    return input_ids, labels


def _target_loss(model, examples) -> torch.Tensor:
    """Mean over requests of the cross-entropy on the target tokens only."""
    losses = []
    for input_ids, labels in examples:
        logits = model(input_ids=input_ids).logits[:, :-1]
        losses.append(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        )
    return torch.stack(losses).mean()


class Editor:
    """Edits facts into a causal LM with one method; the model is restored to its unedited weights after every
    ``edit_single`` / ``edit_batch`` (use ``edit_sequential`` to keep edits)."""

    def __init__(self, model, tokenizer, hparams: Optional[EditHyperParams] = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.hparams = hparams or EditHyperParams()
        self.device = next(model.parameters()).device

    # ---- public API ------------------------------------------------------------------------------------------

    def edit_single(self, request: EditRequest) -> EditResult:
        """Edit one fact from the unedited model, measure, and restore the model."""
        return self.edit_batch([request])

    def edit_batch(self, requests: list[EditRequest]) -> EditResult:
        """Edit several facts with one adapter (one loss over all), measure each, and restore the model."""
        before = self._locality_before(requests)
        start = time.perf_counter()
        edited, losses, changed, adapted, restore = self._train(requests)
        seconds = time.perf_counter() - start
        result = self._measure(edited, requests, before, losses, changed, adapted, seconds)
        restore()
        return result

    def apply(self, requests: list[EditRequest]):
        """Edit and keep the edits: returns ``(edited model, results)``; the edits are merged into the model (the
        editor's model is the edited one afterwards), one after another as in :meth:`edit_sequential`."""
        results = self.edit_sequential(requests)
        return self.model, results

    def edit_sequential(self, requests: list[EditRequest]) -> list[EditResult]:
        """Apply edits one after another, merging each into the model (edits accumulate; the model stays edited),
        then measure every edit on the final model; locality against the model before the first edit."""
        before = {id(r): self._locality_before([r]) for r in requests}
        runs = []
        for request in requests:
            start = time.perf_counter()
            edited, losses, changed, adapted, _ = self._train([request], keep=True)
            runs.append((request, losses, changed, adapted, time.perf_counter() - start))
            self.model = edited
        return [
            self._measure(self.model, [r], before[id(r)], losses, changed, adapted, seconds)
            for r, losses, changed, adapted, seconds in runs
        ]

    # ---- training ----------------------------------------------------------------------------------------------

    def _train(self, requests: list[EditRequest], keep: bool = False):
        if self.hparams.method == "ft-l":
            return self._train_ft_l(requests, keep)
        return self._train_adapter(requests, keep)

    def _adapter_config(self):
        h = self.hparams
        common = dict(
            r=h.r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout, target_modules=list(h.target_modules)
        )
        if h.method == "roselora":
            return RoseLoraConfig(
                **common,
                keep_ratio=h.keep_ratio,
                prune_start_step=h.prune_start_step,
                prune_end_step=h.prune_end_step,
                total_step=h.steps,
                clamp_value=h.clamp_value,
            )
        if h.method == "adalora":
            adalora = {**common, "init_r": h.r, "target_r": max(1, h.r // 2)}
            adalora.pop("r")
            return AdaLoraConfig(
                **adalora,
                tinit=h.prune_start_step,
                tfinal=max(1, h.steps - h.prune_end_step),
                deltaT=1,
                total_step=h.steps,
            )
        return LoraConfig(**common)

    def _train_adapter(self, requests, keep):
        h = self.hparams
        peft_model = get_peft_model(self.model, self._adapter_config())
        examples = [_example(self.tokenizer, r, self.device) for r in requests]
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=h.lr)
        rose = get_roselora_model(peft_model) if h.method == "roselora" else None
        losses = []
        peft_model.train()
        for step in range(h.steps):
            loss = _target_loss(peft_model, examples)
            loss.backward()
            if rose is not None:
                rose.update_importance()
            optimizer.step()
            if rose is not None:
                rose.prune_step()
            elif h.method == "adalora":
                peft_model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
            if step + 1 > h.prune_end_step and loss.item() < h.early_stop_loss:
                break
        peft_model.eval()
        changed, adapted = self._changed_by_adapter(peft_model)
        if keep:
            return peft_model.merge_and_unload(), losses, changed, adapted, None

        def restore():
            self.model = peft_model.unload()

        return peft_model, losses, changed, adapted, restore

    @torch.no_grad()
    def _changed_by_adapter(self, peft_model) -> tuple[int, int]:
        from peft.tuners.lora import LoraLayer

        changed = adapted = 0
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                delta = module.get_delta_weight("default")
                changed += int(torch.count_nonzero(delta))
                adapted += delta.numel()
        return changed, adapted

    def _ft_l_weight(self) -> torch.nn.Parameter:
        layers = self.model.get_decoder().layers
        index = self.hparams.ft_layer if self.hparams.ft_layer is not None else len(layers) // 2
        return layers[index].mlp.down_proj.weight

    def _train_ft_l(self, requests, keep):
        h = self.hparams
        weight = self._ft_l_weight()
        original = weight.detach().clone()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        weight.requires_grad_(True)
        examples = [_example(self.tokenizer, r, self.device) for r in requests]
        optimizer = torch.optim.Adam([weight], lr=h.lr)
        losses = []
        self.model.train()
        for step in range(h.steps):
            loss = _target_loss(self.model, examples)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():  # the L-infinity constraint of FT-L
                weight.copy_(original + (weight - original).clamp(-h.ft_norm, h.ft_norm))
            losses.append(loss.item())
            if step + 1 > h.prune_end_step and loss.item() < h.early_stop_loss:
                break
        self.model.eval()
        weight.requires_grad_(False)
        changed = int(torch.count_nonzero(weight.detach() - original))

        def restore():
            with torch.no_grad():
                weight.copy_(original)

        return self.model, losses, changed, weight.numel(), (None if keep else restore)

    # ---- measuring ---------------------------------------------------------------------------------------------

    def _locality_before(self, requests):
        return [
            metrics.locality_predictions(self.model, self.tokenizer, r.locality_prompts, r.locality_answers)
            for r in requests
        ]

    def _measure(self, model, requests, before, losses, changed, adapted, seconds) -> EditResult:
        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        tok = self.tokenizer
        reliability = mean([metrics.accuracy(model, tok, [r.prompt], [r.target_new]) for r in requests])
        generalization = mean(
            [
                metrics.accuracy(model, tok, r.rephrase_prompts, [r.target_new] * len(r.rephrase_prompts))
                for r in requests
            ]
        )
        locality = mean(
            [
                metrics.locality(b, metrics.locality_predictions(model, tok, r.locality_prompts, r.locality_answers))
                for r, b in zip(requests, before)
            ]
        )
        portability = mean(
            [metrics.accuracy(model, tok, r.portability_prompts, r.portability_answers) for r in requests]
        )
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        return EditResult(
            record_ids=[r.record_id for r in requests],
            reliability=reliability,
            generalization=generalization,
            locality=locality,
            portability=portability,
            steps=len(losses),
            first_loss=losses[0],
            last_loss=losses[-1],
            changed_weights=changed,
            adapted_weights=adapted,
            total_weights=total,
            seconds=seconds,
            losses=losses,
        )
