"""Adapter editing backends: RoseLoRA, LoRA and AdaLoRA, each edit a fresh adapter merged after it (sequences) or
unloaded (single and batch edits), or, with ``shared_adapter``, one adapter trained by every edit of a sequence."""

from __future__ import annotations

import json

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from ...config import RoseLoraConfig
from ...training import get_roselora_model
from .base import SHARED_PREFIX, EditBackend, EditOutcome


OPTIMIZER_PREFIX = f"{SHARED_PREFIX}optimizer."


def json_tensor(value) -> torch.Tensor:
    """A JSON-serialisable value as UTF-8 bytes in a uint8 tensor (safetensors holds tensors only)."""
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor):
    """The value :func:`json_tensor` stored."""
    return json.loads(bytes(tensor.tolist()).decode())


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's state as tensors: ``shared.optimizer.<index>.<name>`` per parameter and
    ``shared.optimizer.param_groups`` (the groups as UTF-8 JSON bytes)."""
    saved = optimizer.state_dict()
    state = {
        f"{OPTIMIZER_PREFIX}{index}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
        for index, values in saved["state"].items()
        for name, value in values.items()
    }
    state[f"{OPTIMIZER_PREFIX}param_groups"] = json_tensor(saved["param_groups"])
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_state` returned.

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
    optimizer.load_state_dict({"state": per_parameter, "param_groups": from_json_tensor(state[groups_key])})


def _adam(peft_model, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)


class AdapterBackend(EditBackend):
    """An edit trains a PEFT adapter on ``target_modules`` with Adam for ``steps`` steps (early stop below
    ``early_stop_loss`` after ``prune_end_step``; then up to ``hold_steps`` more until the edit holds).

    Subclasses give the adapter's config (:meth:`adapter_config`) and what runs around each optimizer step
    (:meth:`before_step`, :meth:`after_step`); the shared adapter's extra state (:meth:`extra_state`)."""

    supports_hold = True

    def __init__(self, model, tokenizer, hparams, objective, stats_texts) -> None:
        super().__init__(model, tokenizer, hparams, objective, stats_texts)
        self._shared = None  # the PeftModel every edit of a sequence trains (``shared_adapter``)
        self._shared_adam = None  # its optimizer (``shared_optimizer``)

    # ---- what subclasses define --------------------------------------------------------------------------------

    def common_config(self) -> dict:
        h = self.hparams
        config = dict(r=h.r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout)
        config["target_modules"] = list(h.target_modules)
        if h.adapter_layers is not None:
            config["layers_to_transform"] = list(h.adapter_layers)
        return config

    def adapter_config(self):
        raise NotImplementedError

    def before_step(self, peft_model) -> None:
        """After ``backward``, before ``optimizer.step()``."""

    def after_step(self, peft_model, step: int) -> None:
        """After ``optimizer.step()``, before ``zero_grad``."""

    def extra_state(self, peft_model) -> dict[str, torch.Tensor]:
        """State of the shared adapter beyond its factors (RoseLoRA: the schedule)."""
        return {}

    def load_extra_state(self, peft_model, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`extra_state`."""

    # ---- the contract ----------------------------------------------------------------------------------------------

    @property
    def model(self):
        return self._shared if self._shared is not None else self.base

    @property
    def shared_adapter(self):
        return self._shared

    def editable_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self._shared.get_base_model() if self._shared is not None else self.base
        return {
            f"{module_name}.weight": module.weight
            for module_name, module in model.named_modules()
            if module_name.split(".")[-1] in self.hparams.target_modules
            and isinstance(getattr(module, "weight", None), torch.Tensor)
        }

    def edit(self, requests, memory, keep) -> EditOutcome:
        loss_of = self.objective.loss_for(self.model, requests, memory)
        held = self.objective.held_check(requests)
        if keep and self.hparams.shared_adapter:
            if self._shared is None:
                self._shared = get_peft_model(self.base, self.adapter_config())
            optimizer = self._shared_optimizer() if self.hparams.shared_optimizer else None
            losses = self._optimise(self._shared, loss_of, optimizer, held)
            return EditOutcome(self._shared, losses, *self._changed_by(self._shared))
        peft_model = get_peft_model(self.base, self.adapter_config())
        losses = self._optimise(peft_model, loss_of, None, held)
        changed, adapted = self._changed_by(peft_model)
        if keep:
            self.base = peft_model.merge_and_unload()
            return EditOutcome(self.base, losses, changed, adapted)

        def restore():
            self.base = peft_model.unload()

        return EditOutcome(peft_model, losses, changed, adapted, restore)

    def adapter_changed_weights(self) -> int:
        return self._changed_by(self._shared)[0] if self._shared is not None else 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shared adapter (``shared.adapter.<key>``: factors and masks; its :meth:`extra_state`) and its optimizer
        (``shared.optimizer.*``); nothing without a shared adapter."""
        if self._shared is None:
            return {}
        state = {
            f"{SHARED_PREFIX}adapter.{key}": value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(self._shared).items()
        }
        state.update(self.extra_state(self._shared))
        if self._shared_adam is not None:
            state.update(optimizer_state(self._shared_adam))
        return state

    def load_state_dict(self, state, edits_done) -> None:
        """Raises:
        ValueError: a shared adapter in the state without ``shared_adapter`` (or with one already made), adapter
            keys that do not fit (named), an optimizer without ``shared_optimizer``, or ``shared_adapter`` and a
            state of edits without a shared adapter.
        """
        if not any(key.startswith(SHARED_PREFIX) for key in state):
            if self.hparams.shared_adapter and edits_done:
                raise ValueError(f"`shared_adapter=True`, but the state of {edits_done} edits holds no shared adapter")
            return
        if not self.hparams.shared_adapter or self._shared is not None:
            super().load_state_dict(state, edits_done)  # refuses
        self._shared = get_peft_model(self.base, self.adapter_config())
        prefix = f"{SHARED_PREFIX}adapter."
        adapter = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        expected = set(get_peft_model_state_dict(self._shared))
        if set(adapter) != expected:
            raise ValueError(
                f"the shared adapter state does not fit this model: unexpected {sorted(set(adapter) - expected)[:3]}, "
                f"missing {sorted(expected - set(adapter))[:3]}"
            )
        set_peft_model_state_dict(self._shared, adapter)
        self.load_extra_state(self._shared, state)
        if self.hparams.shared_optimizer:
            load_optimizer_state(self._shared_optimizer(), state)
        elif any(k.startswith(OPTIMIZER_PREFIX) for k in state):
            raise ValueError("the state holds a shared optimizer, but this editor has `shared_optimizer=False`")

    # ---- training ------------------------------------------------------------------------------------------------

    def _shared_optimizer(self) -> torch.optim.Adam:
        """The one Adam optimizer of the shared adapter (``shared_optimizer``), created at the first edit."""
        if self._shared_adam is None:
            self._shared_adam = _adam(self._shared, self.hparams.lr)
        return self._shared_adam

    def _optimise(self, peft_model, loss_of, optimizer, held) -> list[float]:
        """``steps`` Adam steps of ``loss_of`` on the adapter's trainable parameters (``optimizer``, default a fresh
        one) with :meth:`before_step` / :meth:`after_step` around each, then (``held``, see ``hold_steps``) up to
        ``hold_steps`` more until ``held(peft_model)``; returns the losses."""
        h = self.hparams
        optimizer = optimizer if optimizer is not None else _adam(peft_model, h.lr)
        losses = []
        peft_model.train()
        for step in range(h.steps + h.hold_steps):
            if step >= h.steps and (held is None or held(peft_model)):
                break
            loss = loss_of(peft_model)
            loss.backward()
            self.before_step(peft_model)
            optimizer.step()
            self.after_step(peft_model, step)
            optimizer.zero_grad()
            losses.append(loss.item())
            if h.prune_end_step < step + 1 <= h.steps and loss.item() < h.early_stop_loss:
                if held is None or held(peft_model):
                    break
        peft_model.eval()
        return losses

    @staticmethod
    @torch.no_grad()
    def _changed_by(peft_model) -> tuple[int, int]:
        """Non-zeros of the adapter's merged deltas and the entries of the adapted matrices."""
        changed = adapted = 0
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                delta = module.get_delta_weight("default")
                changed += int(torch.count_nonzero(delta))
                adapted += delta.numel()
        return changed, adapted


class RoseLoraBackend(AdapterBackend):
    """RoseLoRA: importance and prune around every step; a shared adapter's masks are persistent (chosen during the
    first edit, fixed after it)."""

    name = "roselora"
    supports_shared_adapter = True

    def adapter_config(self) -> RoseLoraConfig:
        h = self.hparams
        return RoseLoraConfig(
            **self.common_config(),
            keep_ratio=h.keep_ratio,
            prune_start_step=h.prune_start_step,
            prune_end_step=h.prune_end_step,
            total_step=h.steps,
            clamp_value=h.clamp_value,
            prune_mode="persistent" if h.shared_adapter else "reselect",
        )

    def before_step(self, peft_model) -> None:
        get_roselora_model(peft_model).update_importance()

    def after_step(self, peft_model, step: int) -> None:
        get_roselora_model(peft_model).prune_step()

    def extra_state(self, peft_model) -> dict[str, torch.Tensor]:
        """The schedule state: ``shared.schedule.json`` (counters as UTF-8 bytes) and
        ``shared.schedule.<factor>.<module>`` (the importance EMAs)."""
        schedule = get_roselora_model(peft_model).schedule_state_dict()["adapters"]["default"]
        state = {}
        for factor in ("importance_A", "importance_B"):
            for module_name, value in schedule.pop(factor).items():
                state[f"{SHARED_PREFIX}schedule.{factor}.{module_name}"] = value.contiguous()
        state[f"{SHARED_PREFIX}schedule.json"] = json_tensor(schedule)
        return state

    def load_extra_state(self, peft_model, state) -> None:
        schedule = from_json_tensor(state[f"{SHARED_PREFIX}schedule.json"])
        for factor in ("importance_A", "importance_B"):
            head = f"{SHARED_PREFIX}schedule.{factor}."
            schedule[factor] = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
        get_roselora_model(peft_model).load_schedule_state_dict({"adapters": {"default": schedule}})


class LoraBackend(AdapterBackend):
    """Plain LoRA."""

    name = "lora"
    supports_shared_adapter = True

    def adapter_config(self) -> LoraConfig:
        return LoraConfig(**self.common_config())


class AdaLoraBackend(AdapterBackend):
    """AdaLoRA with ``r`` as its initial rank, ``adalora_target_r`` (default ``r // 2``) as its target, its budget
    schedule mapped onto RoseLoRA's: ``tinit = prune_start_step``, ``tfinal = steps - prune_end_step``."""

    name = "adalora"

    def adapter_config(self) -> AdaLoraConfig:
        h = self.hparams
        common = self.common_config()
        common.pop("r")
        return AdaLoraConfig(
            **common,
            init_r=h.r,
            target_r=h.adalora_target_r if h.adalora_target_r is not None else max(1, h.r // 2),
            tinit=h.prune_start_step,
            tfinal=max(1, h.steps - h.prune_end_step),
            deltaT=1,
            total_step=h.steps,
        )

    def after_step(self, peft_model, step: int) -> None:
        peft_model.base_model.update_and_allocate(step)
