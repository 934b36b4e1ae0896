"""``RoseLoraModel``: the PEFT tuner model of RoseLoRA, with the per-step sparsity schedule."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from . import sharding, sparsity, zero
from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit
from .config import RoseLoraConfig
from .hqq import dispatch_hqq
from .layer import RoseLoraLayer, dispatch_default, dispatch_param_wrapper
from .schedule import AdapterSchedule, ScheduleStateError, replay_last_keep_ratio, should_mask_gradients
from .torchao import dispatch_torchao


SUPPORTED_TARGETS = (
    "torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d, torch.nn.MultiheadAttention, transformers "
    "Conv1D, bitsandbytes Linear8bitLt and Linear4bit, torchao int8 weight-only Linear, HQQLinear, and parameters "
    "named in `target_parameters`"
)


# quantization backends PEFT LoRA has layers for that RoseLoRA does not (none of them runs on CPU, where this project
# is tested): top-level package of the quantized layer's class -> the backend's name
UNSUPPORTED_QUANTIZERS = {
    "auto_gptq": "GPTQ (auto-gptq)",
    "gptqmodel": "GPTQ (GPTQModel)",
    "awq": "AWQ (autoawq)",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "neural_compressor": "Intel Neural Compressor",
    "transformer_engine": "NVIDIA Transformer Engine",
    "megatron": "Megatron-LM",
}


def refuse_unsupported_quantizer(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs) -> None:
    """A dispatcher that takes nothing: it raises a ``ValueError`` naming the backend if ``target``'s base layer
    comes from a quantizer RoseLoRA does not support (placed before the plain layers' dispatcher)."""
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    target_name = kwargs.get("target_name", "<unknown>")
    package = type(base_layer).__module__.split(".")[0]
    backend = UNSUPPORTED_QUANTIZERS.get(package)
    if backend is not None:
        raise ValueError(
            f"RoseLoRA does not support {backend} quantized layers (module '{target_name}' of type "
            f"{type(base_layer).__module__}.{type(base_layer).__qualname__}). Supported quantizers: bitsandbytes "
            "4-bit and 8-bit, torchao int8 weight-only, HQQ; see docs/usage.md."
        )


# tried in order; the first that returns a module makes the layer
DISPATCHERS = (
    dispatch_param_wrapper,
    dispatch_bnb_8bit,
    dispatch_bnb_4bit,
    dispatch_hqq,
    dispatch_torchao,
    refuse_unsupported_quantizer,
    dispatch_default,
)


class RoseLoraModel(LoraModel):
    """Creates a RoseLoRA model from a pretrained model (use ``get_peft_model(model, RoseLoraConfig(...))``).

    Besides everything ``LoraModel`` offers (merge, unmerge, ``merge_and_unload``, ``unload``, multiple adapters,
    ``disable_adapter``, mixed-batch ``adapter_names=``), the model drives the sparsity schedule. In every optimizer
    step of a custom loop::

        loss.backward()
        model.update_importance()   # |w * grad| EMA, before the optimizer changes w
        optimizer.step()
        model.prune_step()          # advance t, prune to keep_ratio(t), clamp
        optimizer.zero_grad()

    or once: ``peft_roselora.register_optimizer_hooks(model, optimizer)``, which makes ``optimizer.step()`` do both.
    ``update_and_allocate(global_step)`` is the AdaLoRA-style single call after ``optimizer.step()``.

    The schedule acts on the active adapters; each adapter has its own step counter and configuration.
    """

    prefix: str = "lora_"
    tuner_layer_cls = RoseLoraLayer

    # ---- construction ------------------------------------------------------------------------------------------

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        """The RoseLoRA layer for ``target``: the first of :data:`DISPATCHERS` that takes it (each backend file's
        ``dispatch_*``, as PEFT's LoRA dispatches).

        Raises:
            ValueError: a quantizer RoseLoRA does not support, or a module type no dispatcher takes (named).
        """
        for dispatch in DISPATCHERS:
            new_module = dispatch(target, adapter_name, lora_config, **kwargs)
            if new_module is not None:
                return new_module
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_type = type(base_layer)
        raise ValueError(
            f"RoseLoRA cannot adapt module '{kwargs.get('target_name', '<unknown>')}' of type "
            f"{layer_type.__module__}.{layer_type.__qualname__}; supported types are {SUPPORTED_TARGETS}. Remove it "
            "from `target_modules`."
        )

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd", **kwargs
    ) -> None:
        """Combine RoseLoRA adapters into a new one; only ``combination_type="cat"`` is supported.

        ``cat`` stacks the rank-one terms of the adapters (rows of ``lora_A``, columns of ``lora_B``), so every row
        and column keeps exactly the sparsity it had; the new adapter's masks are the stacked masks and its merged
        delta is the weighted sum of the adapters' deltas. The other combination types sum or re-factorise (SVD) the
        factors, which destroys the row/column structure.

        Raises:
            ValueError: for any ``combination_type`` other than ``"cat"``.
        """
        if combination_type != "cat":
            raise ValueError(
                f"add_weighted_adapter with combination_type={combination_type!r} is not supported for RoseLoRA: it "
                "would sum or re-factorise the sparse factors and break their row/column masks. Use "
                "combination_type='cat', which keeps them exactly; for a dense combination, export each adapter with "
                "peft_roselora.export_to_lora and combine the plain LoRA adapters with PEFT."
            )
        for name in adapters:  # PEFT's cat reads the raw factors
            for _, layer in self._rose_layers(name):
                layer.apply_masks(name)
        super().add_weighted_adapter(adapters, weights, adapter_name, combination_type="cat", **kwargs)
        for _, layer in self._rose_layers(adapter_name):
            sources = [name for name in adapters if layer.holds_adapter(name)]
            stacked_a = torch.cat([layer.lora_mask_A[name] for name in sources], dim=0)
            stacked_b = torch.cat([layer.lora_mask_B[name] for name in sources], dim=1)
            # PEFT fills the first rows (columns) and leaves the rest of the summed rank zero where a layer holds
            # only some of the adapters: those rank-one terms are empty, so their masks are all False
            mask_a, mask_b = layer.lora_mask_A[adapter_name], layer.lora_mask_B[adapter_name]
            mask_a.zero_()[: stacked_a.shape[0]] = stacked_a
            mask_b.zero_()[:, : stacked_b.shape[1]] = stacked_b
            layer.refresh_mask_state(adapter_name)

    # ---- the schedule ------------------------------------------------------------------------------------------

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # one schedule state owner per RoseLoRA adapter (created on first use)
        self._rose_schedules: dict[str, AdapterSchedule] = {}
        # collectives the schedule issued when FSDP2 shards the factors (not state: counters for benchmarks)
        self.communication_stats = sharding.CommunicationStats()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._invalidate_layer_cache()
        self._rose_schedules.pop(adapter_name, None)

    def adapter_schedule(self, adapter_name: str = "default") -> AdapterSchedule:
        """The :class:`~peft_roselora.schedule.AdapterSchedule` of ``adapter_name`` (its step, counters, EMAs).

        Raises:
            ValueError: if ``adapter_name`` is not a RoseLoRA adapter of this model.
        """
        self._schedule_adapters(adapter_name)
        schedule = self._rose_schedules.get(adapter_name)
        if schedule is None:
            schedule = self._rose_schedules[adapter_name] = AdapterSchedule(self.peft_config[adapter_name])
        schedule.config = self.peft_config[adapter_name]  # the live config (set_total_step, reloaded configs)
        return schedule

    def _rose_layers(self, adapter_name: str) -> list[tuple[str, RoseLoraLayer]]:
        """``(module name, layer)`` of the RoseLoRA layers holding ``adapter_name`` (cached: the hot path must not
        walk the model each step)."""
        cache = self.__dict__.setdefault("_rose_layer_cache", {})
        layers = cache.get(adapter_name)
        if layers is None or (layers and not layers[0][1].holds_adapter(adapter_name)):
            layers = [
                (name, module)
                for name, module in self.model.named_modules()
                if isinstance(module, RoseLoraLayer) and module.holds_adapter(adapter_name)
            ]
            cache[adapter_name] = layers
        return layers

    def _invalidate_layer_cache(self) -> None:
        self.__dict__.pop("_rose_layer_cache", None)

    def inject_adapter(self, *args, **kwargs) -> None:
        super().inject_adapter(*args, **kwargs)
        self._invalidate_layer_cache()

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._invalidate_layer_cache()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _schedule_adapters(self, adapter_names: Optional[Union[str, list[str]]]) -> list[str]:
        if adapter_names is None:
            adapter_names = self.active_adapters
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            if name not in self.peft_config:
                raise ValueError(f"Unknown adapter '{name}'; available: {sorted(self.peft_config)}.")
            if not isinstance(self.peft_config[name], RoseLoraConfig):
                raise ValueError(f"Adapter '{name}' is not a RoseLoRA adapter.")
        return list(adapter_names)

    def steps_taken(self, adapter_name: str = "default") -> int:
        """Number of optimizer steps the schedule of ``adapter_name`` has applied (``t``)."""
        return self.adapter_schedule(adapter_name).step

    def schedule_step(self, adapter_name: str = "default") -> int:
        """Deprecated alias of :meth:`steps_taken` (removed in 0.3)."""
        warnings.warn("schedule_step() is deprecated; use steps_taken().", FutureWarning, stacklevel=2)
        return self.steps_taken(adapter_name)

    def current_keep_ratio(self, adapter_name: str = "default") -> float:
        """The keep ratio ``tau(t)`` of ``adapter_name`` at its current step.

        Raises:
            ValueError: if the adapter's ``total_step`` is not set.
        """
        return self.adapter_schedule(adapter_name).keep_ratio_at()

    def set_total_step(self, total_step: int, adapter_name: Optional[str] = None) -> None:
        """Set ``total_step`` (T) of the given (default: active) adapters, resolving fractional schedule steps.

        Raises:
            ValueError: if the resolved schedule violates ``prune_start_step < prune_end_step <= total_step``.
        """
        for name in self._schedule_adapters(adapter_name):
            config = self.peft_config[name]
            previous = config.total_step
            config.total_step = total_step
            try:
                config._check_schedule_fields()
            except ValueError:
                config.total_step = previous
                raise

    def update_importance(self, adapter_names: Optional[Union[str, list[str]]] = None) -> None:
        """Update the importance EMA ``I_bar`` of every factor from the current weights and gradients.

        Call it after ``loss.backward()`` and before ``optimizer.step()`` (the authors' order), once per optimizer
        step. Acts on the active adapters unless ``adapter_names`` is given. In persistent mode the gradients of
        pruned entries are set to exactly zero first (also when they are NaN or inf). A step whose gradients hold
        NaN or inf leaves the EMAs unchanged and is counted (``nonfinite_steps`` in the sparsity report).

        Raises:
            RuntimeError: if a factor of an adapter has no gradient, or the schedule is driven twice per step (the
                importance of this step was already taken, or no backward pass ran since the previous step).
        """
        for name in self._schedule_adapters(adapter_names):
            schedule = self.adapter_schedule(name)
            layers = self._rose_layers(name)
            if not layers:
                raise RuntimeError(f"Adapter '{name}' has no RoseLoRA layers in this model.")
            weights, grads, parameters = [], [], []
            for _, layer in layers:
                layer_weights, layer_grads = layer.factors_with_grads(name)
                weights += layer_weights
                grads += layer_grads
                parameters += layer.factor_parameters(name)
            with torch.no_grad():
                schedule.check_new_gradients(grads[0])
                needed = schedule.importance_needed()
                repair, gradients_finite = None, False
                if should_mask_gradients(
                    schedule.persistent, [layer.rose_masks_keep_all[name] for _, layer in layers]
                ):
                    # pruned entries get no gradient: the optimizer sees grad * mask, exactly zero where pruned (a
                    # NaN / inf there too: the importance check below notices it and calls repair, so masking the
                    # gradients adds no synchronisation; without an importance this step, the masking checks)
                    masks = [mask for _, layer in layers for mask in layer.factors_and_masks(name)[1]]
                    gradients_finite = sparsity.apply_masks_(grads, masks, check=not needed) == 0

                    def repair(grads=grads, masks=masks, layers=layers, name=name) -> bool:
                        sparsity.apply_masks_(grads, masks)
                        self._commit_gradients(name, layers, grads)
                        return True

                    self._commit_gradients(name, layers, grads)
                schedule.remember_gradient(grads[0])
                if not needed:
                    schedule.mark_importance_not_needed(gradients_finite)
                    continue
                finite = schedule.record_importance(
                    [module for module, _ in layers], weights, grads, self._agreement(parameters), repair
                )
            if not finite:
                warnings.warn(
                    f"RoseLoRA adapter '{name}': non-finite gradients at step {schedule.step + 1}; the importance EMA "
                    "keeps its previous value (counted as nonfinite_steps in the sparsity report and Trainer logs).",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def prune_step(self, adapter_names: Optional[Union[str, list[str]]] = None) -> dict[str, float]:
        """Advance the schedule by one optimizer step and prune: call after ``optimizer.step()``.

        For each adapter: ``t += 1``; if ``tau(t) < 1`` (and ``t`` is on the ``prune_interval`` grid or equals
        ``t_f``) recompute the masks, top ``ceil(tau(t) * in)`` per row of ``lora_A`` and ``ceil(tau(t) * out)`` per
        column of ``lora_B`` by importance; zero the pruned entries (exactly, also if they are NaN or inf); once
        ``t > t_i`` clamp to ``clamp_value`` if set.

        Returns:
            dict[str, float]: the keep ratio ``tau(t)`` per adapter.

        Raises:
            RuntimeError: if ``update_importance()`` was not called since the previous ``prune_step()``.
            ValueError: if ``total_step`` is not set.
        """
        ratios = {}
        for name in self._schedule_adapters(adapter_names):
            schedule = self.adapter_schedule(name)
            plan = schedule.advance()
            layers = self._rose_layers(name)
            if plan.recompute_masks:
                self._recompute_masks(name, schedule, layers, plan.keep_ratio)
            weights, masks = [], []
            for _, layer in layers:
                layer_weights, layer_masks = layer.factors_and_masks(name)
                weights += layer_weights
                masks += layer_masks
            # the check (one synchronisation) only where this step's factors and gradients were not checked finite
            if sparsity.apply_masks_(weights, masks, plan.clamp_value, check=not plan.inputs_checked_finite):
                warnings.warn(
                    f"RoseLoRA adapter '{name}': kept factor entries are NaN or inf after optimizer step {plan.step} "
                    "(pruned entries were zeroed); training has diverged.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            for index, (_, layer) in enumerate(layers):
                layer.commit_factors(name, weights[2 * index : 2 * index + 2])
                layer.mark_masked(name)
            ratios[name] = plan.keep_ratio
        return ratios

    @staticmethod
    def _commit_gradients(name: str, layers: list, grads: list[torch.Tensor]) -> None:
        for index, (_, layer) in enumerate(layers):
            layer.commit_gradients(name, grads[2 * index : 2 * index + 2])

    def skip_step(self, adapter_names: Optional[Union[str, list[str]]] = None) -> None:
        """The optimizer did not apply this step (a GradScaler overflow): drop its importance, run no prune, keep
        ``t``, and count it (``skipped_steps``). ``RoseLoraCallback`` calls it; with optimizer hooks a skipped step
        runs neither hook, so nothing is needed."""
        for name in self._schedule_adapters(adapter_names):
            self.adapter_schedule(name).skip()

    def factors_sharded(self, adapter_name: str = "default") -> bool:
        """Whether FSDP2 shards some factor of ``adapter_name`` (its parameters are ``DTensor``)."""
        return any(
            sharding.is_sharded(parameter)
            for _, layer in self._rose_layers(adapter_name)
            for parameter in layer.factor_parameters(adapter_name)
        )

    def factors_partitioned(self, adapter_name: str = "default") -> bool:
        """Whether reading the whole factors of ``adapter_name`` is collective: FSDP2 shards them, or DeepSpeed ZeRO
        holds their fp32 masters in partitions. Then ``masked_factors``, ``sparsity_report`` and ``factor_density``
        must run on every process (``sparsity_report(support_only=True)`` needs no communication)."""
        return self.factors_sharded(adapter_name) or any(
            zero.is_zero_parameter(parameter)
            for _, layer in self._rose_layers(adapter_name)
            for parameter in layer.factor_parameters(adapter_name)
        )

    def _agreement(self, parameters: list[torch.Tensor]):
        """The cross-process combination of a finiteness flag when FSDP2 shards some factor, else None."""
        if not any(sharding.is_sharded(parameter) for parameter in parameters):
            return None
        return lambda flag: sharding.agree_all_true(flag, parameters, self.communication_stats)

    def _recompute_masks(
        self, name: str, schedule: AdapterSchedule, layers: list[tuple[str, RoseLoraLayer]], keep_ratio: float
    ) -> None:
        """New masks for every layer: per row of ``lora_A`` and per column of ``lora_B`` the top
        ``ceil(keep_ratio * n)`` entries by importance, same-shaped factors sharing one ``topk`` call. Under FSDP2
        the sharded EMAs are gathered first (one collective), and every process selects the same whole masks."""
        parameters = [parameter for _, layer in layers for parameter in layer.factor_parameters(name)]
        importance = sharding.gather_full(
            schedule.importance_of([module for module, _ in layers]), parameters, self.communication_stats
        )
        plain = [index for index, (_, layer) in enumerate(layers) if layer.term_dims is not None]
        if plain:  # a constant number of ops per group of same-shaped factors, whatever the number of modules
            factors, keeps, dims, current = [], [], [], []
            for index in plain:
                layer = layers[index][1]
                for offset, (dim, mask) in enumerate(
                    zip(layer.term_dims, (layer.lora_mask_A[name], layer.lora_mask_B[name]))
                ):
                    factors.append(importance[2 * index + offset])
                    keeps.append(sparsity.kept_count(keep_ratio, mask.shape[dim]))
                    dims.append(dim)
                    current.append(mask)
            chosen = sparsity.grouped_topk_masks(
                factors, keeps, dims, current if schedule.persistent else None, schedule.scores_of
            )
            torch._foreach_copy_(current, chosen)
            for index in plain:
                layers[index][1].rose_masks_keep_all[name] = False
        others = [index for index, (_, layer) in enumerate(layers) if layer.term_dims is None]
        scores, keeps = [], []
        for index in others:
            layer = layers[index][1]
            for score in schedule.selection_scores(
                *layer.term_rows(importance[2 * index], importance[2 * index + 1]),
                *layer.term_rows(layer.lora_mask_A[name], layer.lora_mask_B[name]),
            ):
                scores.append(score)
                keeps.append(sparsity.kept_count(keep_ratio, score.shape[1]))
        masks = sparsity.row_topk_masks(scores, keeps)
        for position, index in enumerate(others):
            layers[index][1].set_masks(name, masks[2 * position], masks[2 * position + 1])

    def update_and_allocate(self, global_step: int) -> dict[str, float]:
        """AdaLoRA-style single call, after ``optimizer.step()`` and before ``optimizer.zero_grad()``.

        Equivalent to ``update_importance()`` then ``prune_step()`` with the schedule at step ``global_step + 1``
        (``global_step`` is the 0-based index of the optimizer step just taken). Unlike the authors' order, the
        importance is computed from the weights *after* the optimizer step; use ``update_importance()`` before
        ``optimizer.step()`` and ``prune_step()`` after it (or ``register_optimizer_hooks``) for the exact method.

        Raises:
            ValueError: if ``global_step`` is negative, not an int, or smaller than a previous call's.
        """
        for name in self._schedule_adapters(None):  # before any side effect
            self.adapter_schedule(name).check_step(global_step)
        self.update_importance()
        for name in self._schedule_adapters(None):
            self.adapter_schedule(name).set_step(global_step)
        return self.prune_step()

    # ---- training checkpoints ----------------------------------------------------------------------------------

    def schedule_state_dict(self) -> dict:
        """The schedule state of every RoseLoRA adapter (not in the adapter file): ``{"adapters": {name:
        AdapterSchedule.state_dict()}}``. ``register_optimizer_hooks`` and ``RoseLoraCallback`` make it travel
        inside ``optimizer.state_dict()``, so whatever checkpoints the optimizer resumes RoseLoRA exactly. Under FSDP2
        the EMAs of sharded factors are ``DTensor`` with the factors' layout (``torch.distributed.checkpoint`` saves
        them sharded; ``get_optimizer_state_dict(..., full_state_dict=True)`` gathers them whole)."""
        adapters = {}
        for name, config in self.peft_config.items():
            if not isinstance(config, RoseLoraConfig):
                continue
            schedule = self.adapter_schedule(name)
            state = adapters[name] = schedule.state_dict()
            for module_name, layer in self._rose_layers(name):
                for factor, parameter in zip(("importance_A", "importance_B"), layer.factor_parameters(name)):
                    if sharding.is_sharded(parameter) and module_name in state[factor]:
                        # sharded like the factor: DCP saves it sharded, full-state-dict helpers gather it
                        live = getattr(schedule, factor)[module_name]
                        state[factor][module_name] = sharding.as_sharded_like(live.detach().clone(), parameter)
        return {"adapters": adapters}

    def load_schedule_state_dict(self, state: dict) -> None:
        """Restore what :meth:`schedule_state_dict` returned.

        Raises:
            ScheduleStateError: for an adapter this model does not have, or anything
                ``AdapterSchedule.load_state_dict`` refuses (names the key, the module and the values).
        """
        if not isinstance(state, dict) or set(state) != {"adapters"} or not isinstance(state["adapters"], dict):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ScheduleStateError(f"RoseLoRA schedule state must be {{'adapters': {{...}}}}, got keys {keys}.")
        for name, adapter_state in state["adapters"].items():
            if not isinstance(self.peft_config.get(name), RoseLoraConfig):
                raise ScheduleStateError(
                    f"RoseLoRA schedule state names adapter '{name}', which is not a RoseLoRA adapter of this model "
                    f"(adapters: {sorted(self.peft_config)})."
                )
            layers = self._rose_layers(name)
            adapter_state = self._local_rows_of_state(name, adapter_state, layers)
            shapes = {module_name: layer.local_factor_shapes(name) for module_name, layer in layers}
            devices = {module_name: layer.lora_mask_A[name].device for module_name, layer in layers}
            self.adapter_schedule(name).load_state_dict(adapter_state, shapes, devices)

    @staticmethod
    def _local_rows_of_state(name: str, adapter_state: dict, layers: list[tuple[str, RoseLoraLayer]]) -> dict:
        """Under FSDP2: the EMAs of a saved state (``DTensor``, whole, or local rows) cut to this process's rows."""
        layers = dict(layers)
        converted = dict(adapter_state)
        for position, factor in enumerate(("importance_A", "importance_B")):
            emas = adapter_state.get(factor)
            if not isinstance(emas, dict):
                continue
            converted[factor] = dict(emas)
            for module_name, value in emas.items():
                layer = layers.get(module_name)
                if layer is None or not isinstance(value, torch.Tensor):
                    continue  # reported by AdapterSchedule.load_state_dict
                parameter = layer.factor_parameters(name)[position]
                if sharding.is_sharded(parameter):
                    converted[factor][module_name] = sharding.local_rows_of(value, parameter)
                elif sharding.is_sharded(value):
                    converted[factor][module_name] = value.full_tensor()
        return converted

    def roselora_state_dict(self) -> dict[str, torch.Tensor]:
        """Deprecated (0.1.0 format, removed in 0.3): flat tensors ``"<adapter>::step"``, ``"<adapter>::pending"``,
        ``"<adapter>::<module>::importance_A|B"``. Use :meth:`schedule_state_dict`, or let the optimizer's state dict
        carry it (``register_optimizer_hooks``)."""
        warnings.warn(
            "roselora_state_dict() is deprecated; the schedule state now travels in optimizer.state_dict() "
            "(register_optimizer_hooks / RoseLoraCallback), or use schedule_state_dict().",
            FutureWarning,
            stacklevel=2,
        )
        state = {}
        for name, adapter_state in self.schedule_state_dict()["adapters"].items():
            state[f"{name}::step"] = torch.tensor(adapter_state["step"], dtype=torch.int64)
            state[f"{name}::pending"] = torch.tensor(adapter_state["importance_pending"])
            for factor in ("importance_A", "importance_B"):
                for module_name, value in adapter_state[factor].items():
                    state[f"{name}::{module_name}::{factor}"] = value
        return state

    def load_roselora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a 0.1.0 schedule state (``roselora_state.safetensors``: step, pending flag, EMAs), converting it.

        The 0.1.0 format did not record the keep ratio of the last mask selection, the fault counters or the
        configuration; the keep ratio is re-derived by replaying the schedule's decisions up to the saved step
        (exact), the counters start at 0, and the configuration is taken to be this adapter's.

        Raises:
            ScheduleStateError: a key that is not ``<adapter>::step``, ``::pending`` or
                ``::<module>::importance_A|B``, an unknown adapter or module, or an EMA of the wrong shape.
        """
        converted: dict[str, dict] = {}
        for key, value in state.items():
            parts = key.split("::")
            if parts[0] not in self.peft_config or not isinstance(self.peft_config[parts[0]], RoseLoraConfig):
                raise ScheduleStateError(
                    f"RoseLoRA state key '{key}' names adapter '{parts[0]}', which is not a RoseLoRA adapter of this "
                    "model."
                )
            schedule = self.adapter_schedule(parts[0])
            entry = converted.setdefault(parts[0], {**schedule.state_dict(), "importance_A": {}, "importance_B": {}})
            entry.update(skipped_steps=0, nonfinite_steps=0, pending_nonfinite=False)
            if parts[1:] == ["step"]:
                entry["step"] = int(value)
            elif parts[1:] == ["pending"]:
                entry["importance_pending"] = bool(value)
            elif len(parts) == 3 and parts[2] in ("importance_A", "importance_B"):
                entry[parts[2]][parts[1]] = value
            else:
                raise ScheduleStateError(
                    f"RoseLoRA state key '{key}' is not '<adapter>::step', '<adapter>::pending' or "
                    "'<adapter>::<module>::importance_A|B'."
                )
        for name, entry in converted.items():
            entry["last_keep_ratio"] = replay_last_keep_ratio(self.peft_config[name], entry["step"])
        self.load_schedule_state_dict({"adapters": converted})

    # ---- reporting ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def masked_adapter_state(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter as its users see it, whole: ``<module>.lora_A`` ``(r, in)`` and ``<module>.lora_B``
        ``(out, r)`` multiplied by their masks, and ``<module>.lora_mask_A`` / ``lora_mask_B``, on CPU. Under FSDP2 and
        DeepSpeed ZeRO the factors are gathered first (collective: call it on every process), so it is the way to
        compare or inspect a sharded adapter exactly."""
        state = {}
        for module_name, layer in self._rose_layers(adapter_name):
            weight_a, weight_b = layer.masked_factors(adapter_name)
            state[f"{module_name}.lora_A"] = weight_a.detach().cpu().contiguous()
            state[f"{module_name}.lora_B"] = weight_b.detach().cpu().contiguous()
            state[f"{module_name}.lora_mask_A"] = layer.lora_mask_A[adapter_name].cpu().contiguous()
            state[f"{module_name}.lora_mask_B"] = layer.lora_mask_B[adapter_name].cpu().contiguous()
        return state

    @torch.no_grad()
    def factor_density(self, adapter_name: Optional[str] = None) -> float:
        """Fraction of non-zero entries over all ``lora_A`` and ``lora_B`` factors of the adapter (cheap: no merged
        deltas are formed; use :meth:`sparsity_report` for those). Under FSDP2 each process counts its rows and the
        counts are summed (one ``all_reduce``: call it on every process)."""
        adapter_name = adapter_name or self.active_adapters[0]
        nonzeros = numel = 0
        parameters = []
        for _, layer in self._rose_layers(adapter_name):
            weights, masks = layer.factors_and_masks(adapter_name)
            nonzeros += sum(int(torch.count_nonzero(weight * mask)) for weight, mask in zip(weights, masks))
            parameters += layer.factor_parameters(adapter_name)
            numel += sum(parameter.numel() for parameter in layer.factor_parameters(adapter_name))
        nonzeros = sharding.sum_over_processes(nonzeros, parameters, self.communication_stats)
        return nonzeros / max(1, numel)

    @torch.no_grad()
    def sparsity_report(
        self, adapter_name: Optional[str] = None, support_only: bool = False
    ) -> sparsity.SparsityReport:
        """Per adapted module and in total: factor non-zeros, keep ratio reached, merged-delta non-zeros and density,
        and the ``r * tau^2`` bound (see ``peft_roselora.sparsity.SparsityReport``).

        Args:
            adapter_name (str | None): the adapter (default: the first active one).
            support_only (bool): measure the masks (the entries the factors may use) instead of the factors: no
                collective under FSDP2, where measuring the factors gathers each of them (call it on every process
                then). The counts are upper bounds of the factors' (an entry inside a mask can still be zero).
        """
        if adapter_name is None:
            adapter_name = self.active_adapters[0]
        config = self.peft_config[adapter_name]
        try:
            keep_ratio = self.current_keep_ratio(adapter_name)
        except ValueError:
            keep_ratio = None
        rows = []
        for module_name, module in self._rose_layers(adapter_name):
            blocks = module.term_blocks
            if support_only:
                rows_a, rows_b = module.term_rows(
                    module.lora_mask_A[adapter_name].float(), module.lora_mask_B[adapter_name].float()
                )
                delta = sparsity.blockwise_outer_sum(rows_a, rows_b, blocks)  # the support of the merged update
            else:
                rows_a, rows_b = module.term_rows(*module.masked_factors(adapter_name))
                delta = module.effective_delta_weight(adapter_name)
            parameter_name = getattr(module, "parameter_name", None)
            if parameter_name is not None:  # target_parameters: name the parameter, not the nested wrappers
                module_name = module_name.replace(".base_layer", "") + f".{parameter_name}"
            rows.append(
                sparsity.module_sparsity(
                    module_name,
                    rows_a,
                    rows_b.T,
                    delta,
                    keep_ratio if keep_ratio is not None else config.keep_ratio,
                    blocks=blocks,
                )
            )
        schedule = self.adapter_schedule(adapter_name)
        return sparsity.SparsityReport(
            adapter_name=adapter_name,
            target_keep_ratio=config.keep_ratio,
            scheduled_keep_ratio=keep_ratio,
            step=schedule.step,
            modules=rows,
            skipped_steps=schedule.skipped_steps,
            nonfinite_steps=schedule.nonfinite_steps,
        )
