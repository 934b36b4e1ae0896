"""``RoseLoraModel``: the PEFT tuner model of RoseLoRA, with the per-step sparsity schedule."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from . import sparsity
from .config import RoseLoraConfig
from .layer import Linear, RoseLoraLayer


SUPPORTED_TARGETS = "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear8bitLt and Linear4bit"


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
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        target_name = kwargs.get("target_name", "<unknown>")
        if is_bnb_available():
            import bitsandbytes as bnb

            from .bnb import Linear8bitLt

            if isinstance(base_layer, bnb.nn.Linear8bitLt):
                kwargs.update(
                    has_fp16_weights=base_layer.state.has_fp16_weights,
                    threshold=base_layer.state.threshold,
                    index=base_layer.index,
                )
                return Linear8bitLt(target, adapter_name, config=lora_config, **kwargs)
        if is_bnb_4bit_available():
            import bitsandbytes as bnb

            from .bnb import Linear4bit

            if isinstance(base_layer, bnb.nn.Linear4bit):
                kwargs.update(
                    compute_dtype=base_layer.compute_dtype,
                    compress_statistics=base_layer.weight.compress_statistics,
                    quant_type=base_layer.weight.quant_type,
                )
                return Linear4bit(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base_layer, torch.nn.Linear):
            if lora_config.fan_in_fan_out:
                warnings.warn(
                    f"fan_in_fan_out=True but '{target_name}' is a torch.nn.Linear: using False.", stacklevel=2
                )
                lora_config.fan_in_fan_out = False
            return Linear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base_layer, Conv1D):
            if not lora_config.fan_in_fan_out:
                warnings.warn(
                    f"fan_in_fan_out=False but '{target_name}' is a transformers Conv1D: using True.", stacklevel=2
                )
                lora_config.fan_in_fan_out = True
            return Linear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
        layer_type = type(base_layer)
        raise ValueError(
            f"RoseLoRA cannot adapt module '{target_name}' of type {layer_type.__module__}.{layer_type.__qualname__}; "
            f"supported types are {SUPPORTED_TARGETS}. Remove it from `target_modules`."
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
                "combination_type='cat', which keeps them exactly."
            )
        for name in adapters:  # PEFT's cat reads the raw factors
            for layer in self._rose_layers(name):
                layer.apply_masks(name)
        super().add_weighted_adapter(adapters, weights, adapter_name, combination_type="cat", **kwargs)
        for layer in self._rose_layers(adapter_name):
            sources = [name for name in adapters if name in layer.lora_A]
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
        # per adapter: optimizer steps taken by the schedule (t), and whether update_importance() ran since the last
        # prune_step()
        self._rose_steps: dict[str, int] = {}
        self._rose_importance_pending: dict[str, bool] = {}
        self._rose_last_keep_ratio: dict[str, float] = {}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._invalidate_layer_cache()
        self._rose_last_keep_ratio.pop(adapter_name, None)
        self._rose_steps.pop(adapter_name, None)
        self._rose_importance_pending.pop(adapter_name, None)

    def _rose_layers(self, adapter_name: str) -> list[RoseLoraLayer]:
        """The RoseLoRA layers holding ``adapter_name`` (cached: the hot path must not walk the model each step)."""
        cache = self.__dict__.setdefault("_rose_layer_cache", {})
        layers = cache.get(adapter_name)
        if layers is None or (layers and adapter_name not in layers[0].lora_A):
            layers = [m for m in self.model.modules() if isinstance(m, RoseLoraLayer) and adapter_name in m.lora_A]
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

    def schedule_step(self, adapter_name: str = "default") -> int:
        """Number of optimizer steps the schedule of ``adapter_name`` has taken (``t``)."""
        return self._rose_steps.get(adapter_name, 0)

    def current_keep_ratio(self, adapter_name: str = "default") -> float:
        """The keep ratio ``tau(t)`` of ``adapter_name`` at its current step.

        Raises:
            ValueError: if the adapter's ``total_step`` is not set.
        """
        config = self.peft_config[adapter_name]
        start, end, _ = config.resolve_schedule()
        return sparsity.keep_ratio_at(self.schedule_step(adapter_name), config.keep_ratio, start, end)

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
        step. Acts on the active adapters unless ``adapter_names`` is given.

        Raises:
            RuntimeError: if a factor of an adapter has no gradient.
        """
        for name in self._schedule_adapters(adapter_names):
            layers = self._rose_layers(name)
            if not layers:
                raise RuntimeError(f"Adapter '{name}' has no RoseLoRA layers in this model.")
            weights = [weight for layer in layers for weight in layer.factors_with_grads(name)]
            config = self.peft_config[name]
            if config.prune_mode == "persistent" and any(not layer.rose_dense[name] for layer in layers):
                # pruned entries get no gradient: the optimizer sees grad * mask
                masks = [mask for layer in layers for mask in layer.factors_and_masks(name)[1]]
                sparsity.apply_masks_([w.grad for w in weights], masks)
            if config.prune_mode == "persistent" and self._rose_last_keep_ratio.get(name) == config.keep_ratio:
                # final masks in persistent mode never change again: the importance is no longer used
                self._rose_importance_pending[name] = True
                continue
            previous = []
            for layer in layers:
                for store in (layer.rose_importance_A, layer.rose_importance_B):
                    ema = store.get(name)
                    device = layer.lora_A[name].weight.device
                    previous.append(ema.to(device) if ema is not None and ema.device != device else ema)
            updated = sparsity.update_importance_emas(
                previous, weights, [w.grad for w in weights], config.importance_beta
            )
            for index, layer in enumerate(layers):
                layer.rose_importance_A[name] = updated[2 * index]
                layer.rose_importance_B[name] = updated[2 * index + 1]
            self._rose_importance_pending[name] = True

    def prune_step(self, adapter_names: Optional[Union[str, list[str]]] = None) -> dict[str, float]:
        """Advance the schedule by one optimizer step and prune: call after ``optimizer.step()``.

        For each adapter: ``t += 1``; if ``tau(t) < 1`` (and ``t`` is on the ``prune_interval`` grid or equals
        ``t_f``) recompute the masks, top ``ceil(tau(t) * in)`` per row of ``lora_A`` and ``ceil(tau(t) * out)`` per
        column of ``lora_B`` by importance; zero the pruned entries; once ``t > t_i`` clamp to ``clamp_value`` if set.

        Returns:
            dict[str, float]: the keep ratio ``tau(t)`` per adapter.

        Raises:
            RuntimeError: if ``update_importance()`` was not called since the previous ``prune_step()``.
            ValueError: if ``total_step`` is not set.
        """
        ratios = {}
        for name in self._schedule_adapters(adapter_names):
            config = self.peft_config[name]
            start, end, _ = config.resolve_schedule()
            if not self._rose_importance_pending.get(name, False):
                raise RuntimeError(
                    f"RoseLoRA prune_step() for adapter '{name}' without a preceding update_importance(): call "
                    "update_importance() after loss.backward() and before optimizer.step() in every optimizer step "
                    "(or use peft_roselora.register_optimizer_hooks / RoseLoraCallback, which do it for you)."
                )
            step = self._rose_steps.get(name, 0) + 1
            self._rose_steps[name] = step
            self._rose_importance_pending[name] = False
            keep_ratio = sparsity.keep_ratio_at(step, config.keep_ratio, start, end)
            recompute = keep_ratio < 1.0 and ((step - start) % config.prune_interval == 0 or step == end)
            if config.prune_mode == "persistent" and self._rose_last_keep_ratio.get(name) == keep_ratio:
                recompute = False  # top-k among the kept entries with an unchanged count selects them all again
            clamp_value = config.clamp_value if step > start else None
            layers = self._rose_layers(name)
            if recompute:
                self._recompute_masks(name, layers, keep_ratio)
                self._rose_last_keep_ratio[name] = keep_ratio
            weights, masks = [], []
            for layer in layers:
                layer_weights, layer_masks = layer.factors_and_masks(name)
                weights += layer_weights
                masks += layer_masks
            sparsity.apply_masks_(weights, masks, clamp_value)
            for layer in layers:
                layer.mark_masked(name)
            ratios[name] = keep_ratio
        return ratios

    @staticmethod
    def _recompute_masks(name: str, layers: list[RoseLoraLayer], keep_ratio: float) -> None:
        """New masks for every layer: per row of ``lora_A`` and per column of ``lora_B`` the top
        ``ceil(keep_ratio * n)`` entries by importance, same-shaped factors sharing one ``topk`` call."""
        scores, keeps = [], []
        for layer in layers:
            for score in layer.pruning_scores(name):
                scores.append(score)
                keeps.append(sparsity.kept_count(keep_ratio, score.shape[1]))
        masks = sparsity.row_topk_masks(scores, keeps)
        for index, layer in enumerate(layers):
            layer.set_masks(name, masks[2 * index], masks[2 * index + 1])

    def update_and_allocate(self, global_step: int) -> dict[str, float]:
        """AdaLoRA-style single call, after ``optimizer.step()`` and before ``optimizer.zero_grad()``.

        Equivalent to ``update_importance()`` then ``prune_step()`` with the schedule at step ``global_step + 1``
        (``global_step`` is the 0-based index of the optimizer step just taken). Unlike the authors' order, the
        importance is computed from the weights *after* the optimizer step; use ``update_importance()`` before
        ``optimizer.step()`` and ``prune_step()`` after it (or ``register_optimizer_hooks``) for the exact method.
        """
        self.update_importance()
        for name in self._schedule_adapters(None):
            self._rose_steps[name] = global_step
        return self.prune_step()

    # ---- training checkpoints ----------------------------------------------------------------------------------

    def roselora_state_dict(self) -> dict[str, torch.Tensor]:
        """The schedule state that is not in the adapter file: per adapter the step ``t`` and the fp32 importance
        EMAs of every factor. Save it with training checkpoints (``RoseLoraCallback`` does) so that a resumed run
        ends exactly where an uninterrupted one would; masks and weights travel in the adapter / model state.

        Returns:
            dict[str, Tensor]: keys ``"<adapter>::step"`` (int64 scalar), ``"<adapter>::pending"`` (bool scalar) and
            ``"<adapter>::<module>::importance_A"`` / ``"...::importance_B"`` (fp32, CPU).
        """
        state = {}
        for name in self.peft_config:
            state[f"{name}::step"] = torch.tensor(self._rose_steps.get(name, 0), dtype=torch.int64)
            state[f"{name}::pending"] = torch.tensor(self._rose_importance_pending.get(name, False))
            for module_name, module in self.model.named_modules():
                if isinstance(module, RoseLoraLayer) and name in module.rose_importance_A:
                    state[f"{name}::{module_name}::importance_A"] = module.rose_importance_A[name].detach().cpu()
                    state[f"{name}::{module_name}::importance_B"] = module.rose_importance_B[name].detach().cpu()
        return state

    def load_roselora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`roselora_state_dict` returned.

        Raises:
            ValueError: if ``state`` names an adapter or module this model does not have.
        """
        modules = {name: m for name, m in self.model.named_modules() if isinstance(m, RoseLoraLayer)}
        for key, value in state.items():
            parts = key.split("::")
            if parts[0] not in self.peft_config:
                raise ValueError(f"RoseLoRA state names adapter '{parts[0]}', which this model does not have.")
            if parts[1] == "step":
                self._rose_steps[parts[0]] = int(value)
            elif parts[1] == "pending":
                self._rose_importance_pending[parts[0]] = bool(value)
            else:
                module = modules.get(parts[1])
                if module is None or parts[0] not in module.lora_A:
                    raise ValueError(f"RoseLoRA state names module '{parts[1]}', which has no adapter '{parts[0]}'.")
                store = module.rose_importance_A if parts[2] == "importance_A" else module.rose_importance_B
                store[parts[0]] = value.to(device=module.lora_A[parts[0]].weight.device, dtype=torch.float32)

    # ---- reporting ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def factor_density(self, adapter_name: Optional[str] = None) -> float:
        """Fraction of non-zero entries over all ``lora_A`` and ``lora_B`` factors of the adapter (cheap: no merged
        deltas are formed; use :meth:`sparsity_report` for those)."""
        adapter_name = adapter_name or self.active_adapters[0]
        nonzeros = numel = 0
        for layer in self._rose_layers(adapter_name):
            weight_a, weight_b = layer.masked_factors(adapter_name)
            nonzeros += int(torch.count_nonzero(weight_a)) + int(torch.count_nonzero(weight_b))
            numel += weight_a.numel() + weight_b.numel()
        return nonzeros / max(1, numel)

    @torch.no_grad()
    def sparsity_report(self, adapter_name: Optional[str] = None) -> sparsity.SparsityReport:
        """Per adapted module and in total: factor non-zeros, keep ratio reached, merged-delta non-zeros and density,
        and the ``r * tau^2`` bound (see ``peft_roselora.sparsity.SparsityReport``)."""
        if adapter_name is None:
            adapter_name = self.active_adapters[0]
        config = self.peft_config[adapter_name]
        try:
            keep_ratio = self.current_keep_ratio(adapter_name)
        except ValueError:
            keep_ratio = None
        rows = []
        for module_name, module in self.model.named_modules():
            if isinstance(module, RoseLoraLayer) and adapter_name in module.lora_A:
                weight_a, weight_b = module.masked_factors(adapter_name)
                rows.append(
                    sparsity.module_sparsity(
                        module_name,
                        weight_a,
                        weight_b,
                        module.get_delta_weight(adapter_name),
                        keep_ratio if keep_ratio is not None else config.keep_ratio,
                    )
                )
        return sparsity.SparsityReport(
            adapter_name=adapter_name,
            target_keep_ratio=config.keep_ratio,
            scheduled_keep_ratio=keep_ratio,
            step=self.schedule_step(adapter_name),
            modules=rows,
        )
