"""Knowledge editing with RoseLoRA (the authors' recipe) and the baselines LoRA, AdaLoRA, FT-L, MEMIT and AlphaEdit.

``Editor.edit_single`` starts every edit from the unedited model (fresh adapter, fresh importance), trains on the
target tokens only, and reports the metrics of ``metrics.py`` together with how many base weights the edit changed.
``edit_batch`` writes several facts with one adapter (one MEMIT / AlphaEdit update); ``edit_sequence`` applies edits
one after another to the same model, merging each (or, with ``shared_adapter``, training one adapter kept across
the sequence), and measures every edit so far at checkpoints (``state_dict`` / ``load_state_dict`` resume it). The
many-edit mode (``replay``, ``preserve_weight``, ``shared_adapter``) is described in docs/editing.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ..config import RoseLoraConfig
from ..training import get_roselora_model
from . import metrics
from .data import EditRequest
from .locate import LocateThenEdit


METHODS = ("roselora", "lora", "adalora", "ft-l", "memit", "alphaedit")
ADAPTER_METHODS = ("roselora", "lora", "adalora")
LOCATE_METHODS = ("memit", "alphaedit")
SHARED_ADAPTER_METHODS = ("roselora", "lora")


@dataclass
class EditHyperParams:
    """Defaults: the authors' RoseLoRA editing recipe (docs/method.md, docs/editing.md); the baselines share steps,
    rank, lr, targets.

    ``ft_layer`` (FT-L): index of the decoder layer whose MLP down projection is fine-tuned (default: the middle
    layer); ``ft_norm``: its L-infinity bound on the weight change.

    MEMIT / AlphaEdit (``peft_roselora.editing.locate``; defaults: the papers'): ``edit_layers`` (default a block at
    15-30 % of the depth), ``fact_token`` (where keys are read: the subject's last token or the prompt's last),
    the target vector's optimiser ``v_lr`` / ``v_steps`` / ``v_weight_decay`` /
    ``kl_factor`` / ``clamp_norm_factor``, MEMIT's ``mom2_weight`` (lambda), AlphaEdit's ``nullspace_threshold`` and
    ``l2``. They ignore the adapter fields (``r``, ``lr``, ``steps``, ...), and the gradient methods ignore theirs.

    Many-edit mode (every gradient method, sequential editing): ``replay`` earlier edits of the sequence are added to
    each step's loss (a fresh sample each step: uniform, or with ``replay_priority`` that fraction of it drawn in
    proportion to each earlier edit's target loss under the model as the edit starts, so forgotten edits are
    rehearsed first; see :func:`replay_picks`); ``preserve_weight`` > 0 adds that weight times the
    cross-entropy of the *unedited* model's predicted tokens on ``preserve_batch`` texts of the editor's text sample
    (a fresh sample each step). Anchoring on the unedited model, not on the model before the current edit, keeps
    drift from accumulating over a sequence; only the predicted token ids are stored (one per text token).

    ``shared_adapter`` (RoseLoRA and LoRA, sequential editing): every edit of the sequence trains the same adapter,
    kept on the model and never merged, instead of a fresh adapter merged after each edit. RoseLoRA's masks are
    then persistent (``prune_mode="persistent"``): chosen by the schedule during the first edit and fixed after it,
    so each adapted matrix changes in at most ``r * keep_ratio**2`` of its entries whatever the number of edits, and
    every later edit can correct what earlier ones disturbed (with ``replay`` and ``preserve_weight``). Each edit
    starts a fresh Adam optimizer unless ``shared_optimizer`` keeps one for the whole sequence (its moments carry
    over from edit to edit, so an edit's first steps are not ``lr``-sized steps on every kept entry, as a fresh
    Adam's are); ``unload()`` of the editor's model removes every edit at once.

    ``hold_steps`` (RoseLoRA, LoRA, AdaLoRA): after an edit's ``steps`` (or its early stop), up to ``hold_steps``
    more steps of the same loss, stopping as soon as the edit holds: the model, in eval mode, predicts every target
    token of every request of the edit (teacher-forced, reliability 1). 0 (the default) stops after ``steps``; the
    steps an edit took are in its ``EditResult.steps``.
    """

    method: Literal["roselora", "lora", "adalora", "ft-l", "memit", "alphaedit"] = "roselora"
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
    adalora_target_r: Optional[int] = None
    ft_layer: Optional[int] = None
    ft_norm: float = 5e-4
    edit_layers: Optional[tuple[int, ...]] = None
    fact_token: Literal["subject_last", "last"] = "subject_last"
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 1e-3
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    mom2_weight: float = 15000.0
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    replay: int = 0
    replay_priority: float = 0.0
    preserve_weight: float = 0.0
    preserve_batch: int = 8
    shared_adapter: bool = False
    shared_optimizer: bool = False
    hold_steps: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}")
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
        for name in ("v_steps", "preserve_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.fact_token not in ("subject_last", "last"):
            raise ValueError(f"`fact_token` must be 'subject_last' or 'last', got {self.fact_token!r}")
        if self.shared_adapter and self.method not in SHARED_ADAPTER_METHODS:
            raise ValueError(
                f"`shared_adapter` needs method in {list(SHARED_ADAPTER_METHODS)}, got method={self.method!r}"
            )
        if self.hold_steps and self.method not in ADAPTER_METHODS:
            raise ValueError(f"`hold_steps` needs method in {list(ADAPTER_METHODS)}, got method={self.method!r}")
        if self.shared_optimizer and not self.shared_adapter:
            raise ValueError("`shared_optimizer=True` needs `shared_adapter=True` (one adapter for the sequence)")
        if self.edit_layers is not None:
            self.edit_layers = tuple(self.edit_layers)
        self.target_modules = tuple(self.target_modules)

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


@dataclass
class SequenceCheckpoint:
    """Sequential editing after ``edits`` edits, every edit so far measured on the current model: ``retention`` (mean
    reliability), ``generalization``, ``locality`` (against the unedited model), ``portability``; ``changed_weights``
    the base weights that now differ from the unedited model's (of ``editable_weights`` the method may change and
    ``total_weights``); ``seconds`` spent editing so far (measuring excluded)."""

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


def _padded_examples(tokenizer, pairs: Sequence[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + target`` ids ``(n, T)`` of encoded ``(prompt ids, target ids)`` pairs, attention mask
    and labels (``-100`` outside the targets)."""
    input_ids, mask = metrics.padded_batch(tokenizer, [p + t for p, t in pairs], device)
    labels = metrics.right_padded([[-100] * len(p) + t for p, t in pairs], -100, device)
    return input_ids, mask, labels


def _padded_examples_of(pairs: Sequence[tuple[list[int], list[int]]], tokenizer, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, mask and labels of ``(text ids, predicted next tokens)`` pairs: every position after the
    first is a label (the prediction made at the position before it)."""
    input_ids, mask = metrics.padded_batch(tokenizer, [ids for ids, _ in pairs], device)
    labels = metrics.right_padded([[-100] + list(predicted) for _, predicted in pairs], -100, device)
    return input_ids, mask, labels


def _request_losses(model, examples) -> torch.Tensor:
    """Each request's mean cross-entropy on its target tokens, shape ``(n,)`` (one padded forward pass)."""
    input_ids, mask, labels = examples
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    shifted = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    counts = (shifted != -100).sum(dim=1)
    return per_token.sum(dim=1) / counts


@torch.no_grad()
def _requests_held(model, examples) -> torch.Tensor:
    """Whether the model predicts every target token of each request (teacher-forced argmax, the reliability
    metric's test), shape ``(n,)`` bool; one padded forward pass in the model's current mode."""
    input_ids, mask, labels = examples
    predicted = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    shifted = labels[:, 1:]
    return ((predicted == shifted) | (shifted == -100)).all(dim=1)


def _target_loss(model, examples) -> torch.Tensor:
    """Mean over requests of each request's mean cross-entropy on its target tokens."""
    return _request_losses(model, examples).mean()


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


SHARED_PREFIX = "shared."


def _json_tensor(value) -> torch.Tensor:
    """A JSON-serialisable value as UTF-8 bytes in a uint8 tensor (safetensors holds tensors only)."""
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def _from_json_tensor(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()).decode())


def _shared_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The shared adapter as tensors: its factors and masks (``shared.adapter.<key>``) and, for RoseLoRA, the
    schedule state (``shared.schedule.json``: counters as UTF-8 bytes; ``shared.schedule.<factor>.<module>``: EMAs)."""
    state = {
        f"{SHARED_PREFIX}adapter.{key}": value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(peft_model).items()
    }
    tuner = peft_model.base_model
    if hasattr(tuner, "schedule_state_dict"):
        schedule = tuner.schedule_state_dict()["adapters"]["default"]
        for factor in ("importance_A", "importance_B"):
            for module_name, value in schedule.pop(factor).items():
                state[f"{SHARED_PREFIX}schedule.{factor}.{module_name}"] = value.contiguous()
        state[f"{SHARED_PREFIX}schedule.json"] = _json_tensor(schedule)
    return state


def _load_shared_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`_shared_adapter_state` returned into a fresh shared adapter.

    Raises:
        ValueError: adapter keys this model does not have, or that it misses (named).
    """
    prefix = f"{SHARED_PREFIX}adapter."
    adapter = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(get_peft_model_state_dict(peft_model))
    if set(adapter) != expected:
        raise ValueError(
            f"the shared adapter state does not fit this model: unexpected {sorted(set(adapter) - expected)[:3]}, "
            f"missing {sorted(expected - set(adapter))[:3]}"
        )
    set_peft_model_state_dict(peft_model, adapter)
    tuner = peft_model.base_model
    if hasattr(tuner, "load_schedule_state_dict"):
        schedule = _from_json_tensor(state[f"{SHARED_PREFIX}schedule.json"])
        for factor in ("importance_A", "importance_B"):
            head = f"{SHARED_PREFIX}schedule.{factor}."
            schedule[factor] = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
        tuner.load_schedule_state_dict({"adapters": {"default": schedule}})


OPTIMIZER_PREFIX = "shared.optimizer."


def _adam(peft_model, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's state as tensors: ``shared.optimizer.<index>.<name>`` per parameter and
    ``shared.optimizer.param_groups`` (the groups as UTF-8 JSON bytes)."""
    saved = optimizer.state_dict()
    state = {
        f"{OPTIMIZER_PREFIX}{index}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
        for index, values in saved["state"].items()
        for name, value in values.items()
    }
    state[f"{OPTIMIZER_PREFIX}param_groups"] = _json_tensor(saved["param_groups"])
    return state


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`_optimizer_state` returned.

    Raises:
        ValueError: the state holds no optimizer (named), or one that does not fit this optimizer.
    """
    groups_key = f"{OPTIMIZER_PREFIX}param_groups"
    if groups_key not in state:
        raise ValueError("`shared_optimizer=True`, but the state holds no optimizer (shared.optimizer.*)")
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(OPTIMIZER_PREFIX) and key != groups_key:
            index, name = key[len(OPTIMIZER_PREFIX) :].split(".", 1)
            per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": _from_json_tensor(state[groups_key])})


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


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
        ValueError: a method or option that needs ``stats_texts`` without it.
    """

    def __init__(self, model, tokenizer, hparams: Optional[EditHyperParams] = None, stats_texts=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.hparams = hparams or EditHyperParams()
        self.device = next(model.parameters()).device
        self.stats_texts = list(stats_texts) if stats_texts is not None else None
        if self.hparams.preserve_weight > 0 and not self.stats_texts:
            raise ValueError(
                f"`preserve_weight`={self.hparams.preserve_weight} needs `stats_texts` (the texts whose predictions "
                f"to preserve); got none"
            )
        self.locate = (
            LocateThenEdit(model, tokenizer, self.hparams.method, self.hparams, self.stats_texts)
            if self.hparams.method in LOCATE_METHODS
            else None
        )
        self.memory: list[EditRequest] = []  # the edits this editor kept, in order (sequential editing)
        self._unedited: Optional[dict[str, torch.Tensor]] = None
        self._reference: dict[int, list[torch.Tensor]] = {}
        self.seconds_editing = 0.0  # editing time of the sequence so far (measuring excluded)
        self._preserve: Optional[list[tuple[list[int], list[int]]]] = None  # (text ids, unedited predictions)
        self._shared = None  # the PeftModel every edit of a sequence trains (``shared_adapter``)
        self._shared_adam: Optional[torch.optim.Adam] = None  # its optimizer (``shared_optimizer``)
        self._encodings: dict[int, tuple[list[int], list[int]]] = {}  # request id -> (prompt ids, target ids)

    # ---- public API ------------------------------------------------------------------------------------------

    @property
    def shared_adapter(self):
        """The ``PeftModel`` whose one adapter holds every edit of a ``shared_adapter`` sequence (None before the
        first edit, or without ``shared_adapter``): ``save_pretrained`` it, or ``unload()`` it to undo every edit."""
        return self._shared

    def edit_single(self, request: EditRequest) -> EditResult:
        """Edit one fact from the unedited model, measure, and restore the model."""
        return self.edit_batch([request])

    def edit_batch(self, requests: list[EditRequest]) -> EditResult:
        """Edit several facts with one adapter (one loss over all; one MEMIT / AlphaEdit update), measure each, and
        restore the model.

        Raises:
            ValueError: with ``shared_adapter=True``, which only sequences use (the adapter outlives each edit).
        """
        if self.hparams.shared_adapter:
            raise ValueError(
                "`shared_adapter=True` applies to sequences (edit_sequence / edit_sequential / apply); edit_single "
                "and edit_batch restore the unedited model after every edit"
            )
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
            self.memory.append(request)
        return [
            self._measure(self.model, [r], before[id(r)], losses, changed, adapted, seconds)
            for r, losses, changed, adapted, seconds in runs
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

        Raises:
            ValueError: a checkpoint outside ``[1, len(requests)]``, or ``requests`` that do not start with the
                edits already made (``self.memory``).
        """
        total = len(requests)
        bad = [c for c in checkpoints if not 1 <= c <= total]
        if bad:
            raise ValueError(f"`checkpoints` must lie in [1, {total}] (the number of requests), got {bad}")
        done = len(self.memory)
        if [id(r) for r in requests[:done]] != [id(r) for r in self.memory] and requests[:done] != self.memory:
            raise ValueError(f"`requests` must start with the {done} edit(s) this editor already made")
        self._remember_unedited()
        self._reference_for(requests)
        marks = sorted(set(checkpoints) | {total})
        results = []
        for index in range(done, total):
            request = requests[index]
            torch.manual_seed(seed + index)
            start = time.perf_counter()
            edited, losses, changed, adapted, _ = self._train([request], keep=True)
            self.seconds_editing += time.perf_counter() - start
            self.model = edited
            self.memory.append(request)
            if on_edit is not None:
                on_edit(
                    index,
                    self._measure(
                        self.model, [request], [self._reference[id(request)]], losses, changed, adapted, 0.0
                    ),
                )
            if index + 1 in marks:
                checkpoint = self.checkpoint(requests[: index + 1])
                results.append(checkpoint)
                if on_checkpoint is not None:
                    on_checkpoint(checkpoint)
        return results

    def checkpoint(self, requests: list[EditRequest]) -> SequenceCheckpoint:
        """Every request of ``requests`` (edits made) measured on the current model."""
        self._reference_for(requests)
        tok, model = self.tokenizer, self.model
        changed = editable = 0
        with torch.no_grad():
            for name, parameter in self._editable_parameters().items():
                changed += int(torch.count_nonzero(parameter.detach().cpu() != self._unedited[name]))
                editable += parameter.numel()
        if self._shared is not None:  # the base weights are untouched: the edits are the shared adapter's delta
            changed += self._changed_by_adapter(self._shared)[0]
        return SequenceCheckpoint(
            edits=len(requests),
            retention=_mean([metrics.accuracy(model, tok, [r.prompt], [r.target_new]) for r in requests]),
            generalization=_mean(
                [
                    metrics.accuracy(model, tok, r.rephrase_prompts, [r.target_new] * len(r.rephrase_prompts))
                    for r in requests
                ]
            ),
            locality=_mean(
                [
                    metrics.locality(
                        self._reference[id(r)],
                        metrics.locality_predictions(model, tok, r.locality_prompts, r.locality_answers),
                    )
                    for r in requests
                ]
            ),
            portability=_mean(
                [metrics.accuracy(model, tok, r.portability_prompts, r.portability_answers) for r in requests]
            ),
            changed_weights=changed,
            editable_weights=editable,
            total_weights=sum(p.numel() for p in model.parameters()),
            seconds=self.seconds_editing,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming a sequence needs: the number of edits made, the weights they changed, AlphaEdit's
        ``K_p K_p^T``, the shared adapter (factors, masks, schedule state). Tensors only (save with
        ``safetensors.torch.save_file``)."""
        self._remember_unedited()
        state = {"edits_done": torch.tensor(len(self.memory))}
        for name, parameter in self._editable_parameters().items():
            state[f"weight.{name}"] = parameter.detach().cpu().contiguous()
        if self.locate is not None:
            state.update({f"locate.{k}": v.contiguous() for k, v in self.locate.state_dict().items()})
        if self._shared is not None:
            state.update(_shared_adapter_state(self._shared))
        if self._shared_adam is not None:
            state.update(_optimizer_state(self._shared_adam))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], requests: list[EditRequest]) -> int:
        """Resume a sequence of ``requests`` on this editor's unedited model: records the unedited predictions,
        restores the edited weights, AlphaEdit's state and the memory of the edits made; returns their number.

        Raises:
            ValueError: the state does not fit this model or names more edits than ``requests`` holds.
        """
        done = int(state["edits_done"])
        if done > len(requests):
            raise ValueError(f"the state holds {done} edits, but only {len(requests)} requests were given")
        self._remember_unedited()
        self._reference_for(requests)
        parameters = self._editable_parameters()
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
        if self.locate is not None:
            self.locate.load_state_dict({k[len("locate.") :]: v for k, v in state.items() if k.startswith("locate.")})
        if any(k.startswith(SHARED_PREFIX) for k in state):
            if not self.hparams.shared_adapter or self._shared is not None:
                raise ValueError(
                    "the state holds a shared adapter, but this editor has `shared_adapter=False` or already one"
                )
            self._shared = get_peft_model(self.model, self._adapter_config())
            _load_shared_adapter_state(self._shared, state)
            self.model = self._shared
            if self.hparams.shared_optimizer:
                _load_optimizer_state(self._shared_optimizer(), state)
            elif any(k.startswith(OPTIMIZER_PREFIX) for k in state):
                raise ValueError("the state holds a shared optimizer, but this editor has `shared_optimizer=False`")
        elif self.hparams.shared_adapter and done:
            raise ValueError(f"`shared_adapter=True`, but the state of {done} edits holds no shared adapter")
        self.memory = list(requests[:done])
        return done

    # ---- training ----------------------------------------------------------------------------------------------

    def _editable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The base weights the method can change, by name: the adapter's target modules' weights, FT-L's matrix,
        MEMIT / AlphaEdit's ``down_proj`` weights."""
        h = self.hparams
        if h.method == "ft-l":
            weight = self._ft_l_weight()
            return {name: p for name, p in self.model.named_parameters() if p is weight}
        if self.locate is not None:
            weights = {id(w) for w in self.locate.weights(self.model).values()}
            return {name: p for name, p in self.model.named_parameters() if id(p) in weights}
        model = self._shared.get_base_model() if self._shared is not None else self.model
        return {
            f"{module_name}.weight": module.weight
            for module_name, module in model.named_modules()
            if module_name.split(".")[-1] in h.target_modules
            and isinstance(getattr(module, "weight", None), torch.Tensor)
        }

    @torch.no_grad()
    def _record_preservation_targets(self) -> None:
        """The unedited model's next-token predictions on every text of the sample (once, before the first edit)."""
        if self._preserve is not None or self.hparams.preserve_weight == 0:
            return
        self._preserve = []
        for start in range(0, len(self.stats_texts), 32):
            texts = self.stats_texts[start : start + 32]
            encoded = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
            input_ids, mask = metrics.padded_batch(self.tokenizer, encoded, self.device)
            predicted = self.model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
            for row in range(len(input_ids)):
                length = int(mask[row].sum())
                if length < 2:  # nothing to predict
                    continue
                self._preserve.append((input_ids[row, :length].tolist(), predicted[row, : length - 1].tolist()))

    def _remember_unedited(self) -> None:
        self._record_preservation_targets()
        if self._unedited is None:
            self._unedited = {name: p.detach().cpu().clone() for name, p in self._editable_parameters().items()}

    def _reference_for(self, requests) -> None:
        """The unedited model's locality predictions of each request (computed once, before the request's edit)."""
        missing = [r for r in requests if id(r) not in self._reference]
        if any(r in self.memory for r in missing):
            raise ValueError("the unedited model's predictions of an edit already made were not recorded")
        for request in missing:
            self._reference[id(request)] = self._locality_before([request])[0]

    def _train(self, requests: list[EditRequest], keep: bool = False):
        if self.hparams.method == "ft-l":
            return self._train_ft_l(requests, keep)
        if self.locate is not None:
            return self._train_locate(requests, keep)
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
                prune_mode="persistent" if h.shared_adapter else "reselect",
            )
        if h.method == "adalora":
            target_r = h.adalora_target_r if h.adalora_target_r is not None else max(1, h.r // 2)
            adalora = {**common, "init_r": h.r, "target_r": target_r}
            adalora.pop("r")
            return AdaLoraConfig(
                **adalora,
                tinit=h.prune_start_step,
                tfinal=max(1, h.steps - h.prune_end_step),
                deltaT=1,
                total_step=h.steps,
            )
        return LoraConfig(**common)

    def _encoded(self, request: EditRequest) -> tuple[list[int], list[int]]:
        """``(prompt ids, target ids)`` of a request, tokenized once (replay reads the same requests every step)."""
        if id(request) not in self._encodings:
            self._encodings[id(request)] = metrics.encode_prompt_target(
                self.tokenizer, request.prompt, request.target_new
            )
        return self._encodings[id(request)]

    @torch.no_grad()
    def _memory_losses(self, batch_size: int = 64) -> torch.Tensor:
        """Each earlier edit's target loss under the current model (eval mode), shape ``(len(self.memory),)``."""
        training = self.model.training
        self.model.eval()
        losses = [
            _request_losses(
                self.model,
                _padded_examples(
                    self.tokenizer, [self._encoded(r) for r in self.memory[start : start + batch_size]], self.device
                ),
            )
            for start in range(0, len(self.memory), batch_size)
        ]
        self.model.train(training)
        return torch.cat(losses).cpu()

    def _many_edit_loss(self, requests):
        """The step's loss function: the requests' target loss, plus (many-edit mode) ``replay`` earlier edits and
        the preservation cross-entropy to the unedited model's predictions on a sample of the text sample."""
        h = self.hparams
        examples = _padded_examples(self.tokenizer, [self._encoded(r) for r in requests], self.device)
        self._record_preservation_targets()

        priorities = self._memory_losses() if h.replay and h.replay_priority > 0 and self.memory else None

        def loss_of(model) -> torch.Tensor:
            loss = _target_loss(model, examples)
            if h.replay and self.memory:
                picks = replay_picks(len(self.memory), h.replay, priorities, h.replay_priority)
                replayed = _padded_examples(
                    self.tokenizer, [self._encoded(self.memory[i]) for i in picks], self.device
                )
                count = len(picks)
                loss = (loss * len(requests) + _target_loss(model, replayed) * count) / (len(requests) + count)
            if h.preserve_weight > 0:
                picks = torch.randint(len(self._preserve), (h.preserve_batch,)).tolist()
                batch = _padded_examples_of([self._preserve[i] for i in picks], self.tokenizer, self.device)
                loss = loss + h.preserve_weight * _target_loss(model, batch)
            return loss

        return loss_of

    def _held_check(self, requests) -> Optional[Callable[[torch.nn.Module], bool]]:
        """``hold_steps``: a function telling whether the model (put in eval mode for the check) holds every request;
        None without ``hold_steps``."""
        if not self.hparams.hold_steps:
            return None
        examples = _padded_examples(self.tokenizer, [self._encoded(r) for r in requests], self.device)

        def held(model) -> bool:
            training = model.training
            model.eval()
            verdict = bool(_requests_held(model, examples).all())
            model.train(training)
            return verdict

        return held

    def _train_adapter(self, requests, keep):
        h = self.hparams
        loss_of = self._many_edit_loss(requests)
        held = self._held_check(requests)
        if keep and h.shared_adapter:
            if self._shared is None:
                self._shared = get_peft_model(self.model, self._adapter_config())
            optimizer = self._shared_optimizer() if h.shared_optimizer else None
            losses = self._optimise_adapter(self._shared, loss_of, optimizer, held=held)
            changed, adapted = self._changed_by_adapter(self._shared)
            return self._shared, losses, changed, adapted, None
        peft_model = get_peft_model(self.model, self._adapter_config())
        losses = self._optimise_adapter(peft_model, loss_of, held=held)
        changed, adapted = self._changed_by_adapter(peft_model)
        if keep:
            return peft_model.merge_and_unload(), losses, changed, adapted, None

        def restore():
            self.model = peft_model.unload()

        return peft_model, losses, changed, adapted, restore

    def _shared_optimizer(self) -> torch.optim.Adam:
        """The one Adam optimizer of the shared adapter (``shared_optimizer``), created at the first edit."""
        if self._shared_adam is None:
            self._shared_adam = _adam(self._shared, self.hparams.lr)
        return self._shared_adam

    def _optimise_adapter(self, peft_model, loss_of, optimizer=None, held=None) -> list[float]:
        """``steps`` Adam steps of ``loss_of`` on the adapter's trainable parameters (``optimizer``, default a fresh
        one), with RoseLoRA's importance and prune (AdaLoRA's allocation) around each, then (``held``, see
        ``hold_steps``) up to ``hold_steps`` more until ``held(peft_model)``; returns the losses."""
        h = self.hparams
        optimizer = optimizer if optimizer is not None else _adam(peft_model, h.lr)
        rose = get_roselora_model(peft_model) if h.method == "roselora" else None
        losses = []
        peft_model.train()
        for step in range(h.steps + h.hold_steps):
            if step >= h.steps and (held is None or held(peft_model)):
                break
            loss = loss_of(peft_model)
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
            if h.prune_end_step < step + 1 <= h.steps and loss.item() < h.early_stop_loss:
                if held is None or held(peft_model):
                    break
        peft_model.eval()
        return losses

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
        loss_of = self._many_edit_loss(requests)
        weight = self._ft_l_weight()
        original = weight.detach().clone()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        weight.requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=h.lr)
        losses = []
        self.model.train()
        for step in range(h.steps):
            loss = loss_of(self.model)
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

    def _train_locate(self, requests, keep):
        weights = self.locate.weights(self.model)
        originals = {layer: w.detach().clone() for layer, w in weights.items()}
        losses = self.locate.edit(self.model, requests, remember=keep)
        with torch.no_grad():
            changed = sum(int(torch.count_nonzero(w - originals[layer])) for layer, w in weights.items())
        adapted = sum(w.numel() for w in weights.values())

        def restore():
            with torch.no_grad():
                for layer, w in weights.items():
                    w.copy_(originals[layer])

        return self.model, losses, changed, adapted, (None if keep else restore)

    # ---- measuring ---------------------------------------------------------------------------------------------

    def _locality_before(self, requests):
        return [
            metrics.locality_predictions(self.model, self.tokenizer, r.locality_prompts, r.locality_answers)
            for r in requests
        ]

    def _measure(self, model, requests, before, losses, changed, adapted, seconds) -> EditResult:
        tok = self.tokenizer
        reliability = _mean([metrics.accuracy(model, tok, [r.prompt], [r.target_new]) for r in requests])
        generalization = _mean(
            [
                metrics.accuracy(model, tok, r.rephrase_prompts, [r.target_new] * len(r.rephrase_prompts))
                for r in requests
            ]
        )
        locality = _mean(
            [
                metrics.locality(b, metrics.locality_predictions(model, tok, r.locality_prompts, r.locality_answers))
                for r, b in zip(requests, before)
            ]
        )
        portability = _mean(
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
