"""RoseLoRA layers: PEFT LoRA layers whose factors carry per-adapter row/column masks.

The masking lives in one ``LoraVariant`` (``RoseLoraVariant``), so PEFT's own ``Linear`` (and the bitsandbytes
layers in ``bnb.py``) keep their forward, mixed-batch forward, merge, safe merge and unmerge code and dispatch to the
variant for RoseLoRA adapters. ``RoseLoraLayer`` adds the per-adapter state:

- ``lora_mask_A[adapter]``: bool, shape ``(r, in_features)``; ``lora_mask_B[adapter]``: bool, ``(out_features, r)``.
  Persistent buffers: saved in ``adapter_model.safetensors`` next to the factors.

Layers hold factors and masks only; the schedule state (step, importance EMAs, counters) lives in one
``peft_roselora.schedule.AdapterSchedule`` per adapter, owned by ``RoseLoraModel``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Conv1d as LoraConv1d
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Conv3d as LoraConv3d
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.lora.layer import ParamWrapper as LoraParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose

from . import sharding, sparsity, zero


# state-dict key suffix of each factor (Linear-like and convolution layers; embeddings) -> the suffix of its mask
FACTOR_MASK_KEYS = {
    "lora_A.weight": "lora_mask_A",
    "lora_B.weight": "lora_mask_B",
    "lora_embedding_A": "lora_mask_A",
    "lora_embedding_B": "lora_mask_B",
}


def factor_rows(tensor: torch.Tensor, factor_key: str) -> torch.Tensor:
    """A saved factor (or its mask) as a 2-D matrix whose rows are what pruning keeps a fixed count of: ``lora_A``
    ``(r, ...)`` -> ``(r, n)``; ``lora_B`` ``(out, r, ...)`` -> its columns, ``(r * ..., out)`` (a view)."""
    matrix = tensor.reshape(tensor.shape[0], -1)
    return matrix.T if mask_key_of(factor_key).endswith("B") else matrix


def mask_key_of(factor_key: str) -> Optional[str]:
    """The state-dict key of the mask of the factor stored under ``factor_key``; None if it is not a factor."""
    suffix = next((suffix for suffix in FACTOR_MASK_KEYS if factor_key.endswith(suffix)), None)
    return None if suffix is None else factor_key[: -len(suffix)] + FACTOR_MASK_KEYS[suffix]


# training forward passes of an adapter whose schedule never ran before RoseLoRA warns that this is plain LoRA
UNSCHEDULED_FORWARDS_BEFORE_WARNING = 20


def _after_load_state_dict(module: RoseLoraLayer, incompatible_keys) -> None:
    for adapter_name in list(module.lora_mask_A):
        module.refresh_mask_state(adapter_name)


class RoseLoraVariant(LoraVariant):
    """The RoseLoRA ``LoraVariant``: LoRA whose factors are exactly zero outside their masks.

    Forward uses the factors as they are once :meth:`RoseLoraLayer.ensure_masked` has zeroed any entry modified
    outside the masks since the last prune (so gradients are those of the authors' code, where pruned weights are
    simply zero; ``prune_mode="persistent"`` masks gradients in ``update_importance``). Merging adds
    ``scaling * (B * mask_B) @ (A * mask_A)``, whose density is at most ``r * tau^2``.
    """

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def init(module: RoseLoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Create the dense masks of ``adapter_name`` on the base layer's device."""
        module.init_rose_state(adapter_name)

    @staticmethod
    def merge_safe(module: RoseLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return module.cast_merged_weight(orig_weight + module.get_delta_weight(active_adapter), orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: RoseLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: RoseLoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return module.cast_merged_weight(orig_weight - module.get_delta_weight(active_adapter), orig_weight.dtype)

    @staticmethod
    def forward(
        module: RoseLoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # no Python state read or written: nothing for Dynamo to guard on
            weight_a, weight_b = module.masked_factors_for_graph(active_adapter)
            x = module.lora_dropout[active_adapter](x.to(weight_a.dtype))
            output = F.linear(F.linear(x, weight_a), weight_b, module.lora_B[active_adapter].bias)
            return result + (output * module.scaling[active_adapter]).to(result.dtype)
        if module.training and active_adapter not in module.rose_masked_versions and torch.is_grad_enabled():
            module.count_unscheduled_forward()
        module.ensure_masked(active_adapter)
        weight_a = module.lora_A[active_adapter].weight
        x = module.lora_dropout[active_adapter](x.to(weight_a.dtype))
        output = F.linear(
            F.linear(x, weight_a), module.lora_B[active_adapter].weight, module.lora_B[active_adapter].bias
        )
        return result + (output * module.scaling[active_adapter]).to(result.dtype)


class RoseLoraLayer(LoraLayer):
    """Mixin over a PEFT ``LoraLayer`` that resolves every adapter to ``RoseLoraVariant`` and holds its state."""

    other_param_names = LoraLayer.other_param_names + (
        "lora_mask_A",
        "lora_mask_B",
        "rose_masks_keep_all",
        "rose_masked_versions",
    )

    def resolve_lora_variant(self, *, config, **kwargs) -> Optional[LoraVariant]:
        return RoseLoraVariant()

    def cast_merged_weight(self, merged: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
        """The merged (or unmerged) weight in the dtype the base layer stores: the base dtype for a plain layer.

        Quantized layers override this to keep the promoted dtype, because they re-quantize the result (PEFT LoRA
        does the same, so a merged RoseLoRA adapter equals the merged plain-LoRA export bit for bit).
        """
        return merged.to(base_dtype)

    def init_rose_state(self, adapter_name: str) -> None:
        """Create (or reset to all-True) the masks of ``adapter_name``."""
        if not hasattr(self, "lora_mask_A"):
            self.lora_mask_A = BufferDict(persistent=True)
            self.lora_mask_B = BufferDict(persistent=True)
            # per adapter: whether the masks keep every entry (masking is then an exact no-op), and the in-place
            # version counters of the factors when they were last zeroed outside the masks
            self.rose_masks_keep_all: dict[str, bool] = {}
            self.rose_masked_versions: dict[str, tuple[int, int]] = {}
            self.register_load_state_dict_post_hook(_after_load_state_dict)
        device = self._rose_device()
        weight_a, weight_b = self.factor_parameters(adapter_name)
        self.lora_mask_A[adapter_name] = torch.ones(zero.full_shape(weight_a), dtype=torch.bool, device=device)
        self.lora_mask_B[adapter_name] = torch.ones(zero.full_shape(weight_b), dtype=torch.bool, device=device)
        self.rose_masks_keep_all[adapter_name] = True
        self.rose_masked_versions.pop(adapter_name, None)

    @torch.no_grad()
    def refresh_mask_state(self, adapter_name: str) -> None:
        """After masks or factors were set from outside the schedule (loading, combining adapters): re-derive whether
        the masks keep every entry, and forget that the factors were masked, so that the next forward zeroes them
        outside the masks before using them (the loaded values themselves are left as they were saved)."""
        mask_a, mask_b = self.lora_mask_A[adapter_name], self.lora_mask_B[adapter_name]
        self.rose_masked_versions.pop(adapter_name, None)
        if mask_a.device.type != "meta":
            self.rose_masks_keep_all[adapter_name] = bool(mask_a.all()) and bool(mask_b.all())

    def holds_adapter(self, adapter_name: str) -> bool:
        """Whether this layer has factors (and masks) of ``adapter_name``."""
        return adapter_name in getattr(self, "lora_mask_A", {})

    def _rose_device(self) -> torch.device:
        """Where masks are created: the base layer's weight's device (not the factors', which are on the meta device
        while ``low_cpu_mem_usage=True`` loading runs)."""
        return self.get_base_layer().weight.device

    def _factor_versions(self, adapter_name: str) -> tuple[int, int]:
        weight_a, weight_b = self.factor_parameters(adapter_name)
        return weight_a._version, weight_b._version

    # ---- rank-one terms: the rows of lora_A and the columns of lora_B ---------------------------------------------

    @property
    def term_blocks(self) -> int:
        """Number of blocks the terms split into, each making its own part of the update (1; the experts of an
        expert parameter; the groups of a grouped convolution). Term ``i`` belongs to block ``i // (terms / E)``."""
        return 1

    def effective_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The merged update of ``adapter_name`` as the forward applies it (what the sparsity report counts):
        :meth:`get_delta_weight`, except where that is not defined (grouped convolutions)."""
        return self.get_delta_weight(adapter_name)

    # the dimension of lora_A and of lora_B along which one rank-one term's entries lie, when term_rows is (A, B.T):
    # a row of A (-1), a column of B (-2). Layers laying terms out otherwise set None (their own term_rows is used).
    term_dims: Optional[tuple[int, int]] = (-1, -2)

    def term_rows(self, tensor_a: torch.Tensor, tensor_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors shaped like ``[lora_A, lora_B]`` (weights, gradients, importance or masks) as two row-major
        matrices, one row per rank-one term: ``(terms, n_a)``, the row of ``lora_A`` the term uses, and
        ``(terms, n_b)``, its column of ``lora_B``. Row ``i`` of both belongs to the same term. Top-k selection,
        densities and the Prop. 1 bound work on these (``docs/method.md``, "Layer types").

        ``Linear`` / ``Conv1D`` / ``Embedding`` / ``MultiheadAttention``: ``(A, B.T)``, views. Layers whose factors
        are laid out otherwise (convolutions, expert parameters) override this and :meth:`from_term_rows`.
        """
        return tensor_a, tensor_b.T

    def from_term_rows(self, rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`term_rows`: tensors shaped like ``[lora_A, lora_B]``."""
        return rows_a, rows_b.T

    def ensure_masked(self, adapter_name: str) -> None:
        """Make the factors exactly zero outside the masks before they are used: a no-op (two integer comparisons)
        unless they were modified in place since they were last masked, as by an optimizer step not followed by
        ``prune_step()``. Fused optimizers bypass the version counters this relies on; the schedule's
        ``prune_step()`` after every optimizer step keeps the factors masked regardless."""
        if self.rose_masks_keep_all[adapter_name]:
            return
        storage = self.factor_storage(adapter_name)
        if storage == "fsdp2":
            # the forward sees an all-gathered copy of the factors; their shards are masked by prune_step()
            return
        if storage != "zero3" and self.rose_masked_versions.get(adapter_name) == self._factor_versions(adapter_name):
            return
        # the tensors the forward uses (under ZeRO-3 gathered for this forward only: masked every time)
        sparsity.apply_masks_(
            self.factor_parameters(adapter_name), [self.lora_mask_A[adapter_name], self.lora_mask_B[adapter_name]]
        )
        self.mark_masked(adapter_name)

    def factor_storage(self, adapter_name: str) -> str:
        """How the factors of ``adapter_name`` are stored, read from the parameters themselves (the same answer
        whichever call asks first): ``"whole"`` (plain parameters), ``"fsdp2"`` (``DTensor`` shards, FSDP2),
        ``"zero"`` (DeepSpeed ZeRO-1/2 partitions of the fp32 masters) or ``"zero3"`` (ZeRO-3: gathered per
        forward)."""
        weight = self.factor_parameters(adapter_name)[0]
        if sharding.is_sharded(weight):
            return "fsdp2"
        if zero.is_zero_parameter(weight):
            return "zero3" if zero.is_zero_stage3(weight) else "zero"
        return "whole"

    def masked_factors_for_graph(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors as the forward uses them, without in-place masking (for ``torch.compile``): ``W + (W * mask
        - W).detach()`` for ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``. Its value is ``W * mask`` exactly
        (``w + (w - w) = w`` and ``w + (0 - w) = 0`` in floating point), equal to the eager forward's in-place
        masked factors, and its gradient is the eager one (that of the factor itself), so compiled and eager
        training match."""
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        mask_a, mask_b = self.lora_mask_A[adapter_name], self.lora_mask_B[adapter_name]
        return (
            weight_a + (weight_a * mask_a - weight_a).detach(),
            weight_b + (weight_b * mask_b - weight_b).detach(),
        )

    def count_unscheduled_forward(self) -> None:
        """Count a training forward pass of an adapter whose importance was never updated; warn at the 20th."""
        self._rose_unscheduled_forwards = getattr(self, "_rose_unscheduled_forwards", 0) + 1
        if self._rose_unscheduled_forwards == UNSCHEDULED_FORWARDS_BEFORE_WARNING:
            warnings.warn(
                f"RoseLoRA: {UNSCHEDULED_FORWARDS_BEFORE_WARNING} training forward passes ran but the sparsity "
                "schedule never did, so this is training plain (dense) LoRA. Add RoseLoraCallback() to the Trainer's "
                "callbacks, call peft_roselora.register_optimizer_hooks(model, optimizer), or call "
                "model.update_importance() / model.prune_step() around optimizer.step().",
                UserWarning,
                stacklevel=2,
            )

    @torch.no_grad()
    def masked_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked factors of ``adapter_name`` (no gradient): ``(A * mask_A, B * mask_B)``, shapes ``(r, in)`` and
        ``(out, r)``. Under FSDP2 and DeepSpeed ZeRO the factors are gathered whole first (a collective: call it on
        every process)."""
        weight_a, weight_b = (
            weight.full_tensor()
            if sharding.is_sharded(weight)
            else zero.full_weight(weight)
            if zero.is_zero_parameter(weight)
            else weight
            for weight in self.factor_parameters(adapter_name)
        )
        return weight_a * self.lora_mask_A[adapter_name], weight_b * self.lora_mask_B[adapter_name]

    def get_delta_weight(self, adapter: str, *args, **kwargs) -> torch.Tensor:
        """The merged update of ``adapter`` from its masked factors: PEFT LoRA's own ``get_delta_weight`` of the layer
        type once the factors are exactly zero outside their masks (differentiable: ``MultiheadAttention`` and
        expert-parameter layers train through it). When FSDP2 or DeepSpeed ZeRO partitions the factors (``Linear``
        layers), ``scaling * (B * mask_B) @ (A * mask_A)`` from the gathered factors, transposed for
        ``fan_in_fan_out`` (``Conv1D``) bases.

        Returns:
            Tensor: shape of the base weight, in the dtype of the factors (computed in fp32 for half factors on CPU).
        """
        if not any(sharding.is_sharded(w) or zero.is_zero_parameter(w) for w in self.factor_parameters(adapter)):
            self.ensure_masked(adapter)
            return super().get_delta_weight(adapter, *args, **kwargs)
        weight_a, weight_b = self.masked_factors(adapter)
        dtype = weight_b.dtype
        if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_a, weight_b = weight_a.float(), weight_b.float()
        delta = transpose(weight_b @ weight_a, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]
        return delta.to(dtype)

    # ---- the training step, called by RoseLoraModel for every adapted module --------------------------------------

    def factor_parameters(self, adapter_name: str) -> list[torch.Tensor]:
        """``[lora_A weight, lora_B weight]`` of ``adapter_name`` as registered (``DTensor`` under FSDP2)."""
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def factors_with_grads(self, adapter_name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The factors ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` as the schedule works on them, and their
        gradients: the parameters themselves; under FSDP2 the rows this process holds; under DeepSpeed ZeRO whole
        fp32 copies (collective; write changes back with :meth:`commit_gradients` / :meth:`commit_factors`).

        Returns:
            tuple: ``([A, B], [grad A, grad B])``.

        Raises:
            RuntimeError: if a factor has no gradient.
            NotImplementedError: if a factor is sharded other than by FSDP2 along dim 0 on a 1-D mesh, or flattened
                (FSDP1).
        """
        weights, grads = [], []
        for factor, weight in zip(("lora_A", "lora_B"), self.factor_parameters(adapter_name)):
            partitioned = zero.is_zero_parameter(weight)
            if partitioned:
                grad = zero.full_gradient(weight)
            else:
                self._factor_rows(adapter_name, factor, weight)
                grad = weight.grad
            if grad is None:
                raise RuntimeError(
                    f"RoseLoRA importance update for adapter '{adapter_name}' found no gradient on {factor}: call it "
                    "after loss.backward() and before optimizer.zero_grad() (and make sure the adapter is trainable)."
                )
            weights.append(zero.full_weight(weight) if partitioned else sharding.local_tensor(weight))
            grads.append(grad if partitioned else sharding.local_tensor(grad))
        return weights, grads

    def _factor_rows(self, adapter_name: str, factor: str, weight: torch.Tensor) -> Optional[slice]:
        """The rows of ``weight`` this process holds: a slice for an FSDP2 shard (``DTensor``, ``Shard(0)``), None
        for a whole factor. Factors that a wrapper has flattened or cut across rows are refused (FSDP1, whose
        ``use_orig_params`` views are 1-D pieces of a flat shard).

        Raises:
            NotImplementedError: naming the factor, its shape and the expected one.
        """
        mask = (self.lora_mask_A if factor == "lora_A" else self.lora_mask_B)[adapter_name]
        if sharding.is_sharded(weight):
            return sharding.shard_rows(weight)  # checks the layout
        if weight.shape != mask.shape:
            raise NotImplementedError(
                f"RoseLoRA {factor} of adapter '{adapter_name}' has shape {tuple(weight.shape)}, expected "
                f"{tuple(mask.shape)}: it was flattened or sharded across rows, as FSDP1 (FullyShardedDataParallel) "
                "does. Use FSDP2 (torch.distributed.fsdp.fully_shard, or fsdp_config={'version': 2} in the Trainer); "
                "see docs/training.md."
            )
        return None

    def commit_factors(self, adapter_name: str, weights: list[torch.Tensor]) -> None:
        """Write factors changed by the schedule (``[A, B]`` from :meth:`factors_and_masks`) back where the
        optimizer keeps them: a no-op for parameters and FSDP2 shards (changed in place), the fp32 masters under
        DeepSpeed ZeRO."""
        for weight, value in zip(self.factor_parameters(adapter_name), weights):
            if zero.is_zero_parameter(weight):
                zero.set_full_weight(weight, value)

    def commit_gradients(self, adapter_name: str, grads: list[torch.Tensor]) -> None:
        """Write gradients changed by the schedule (persistent mode) back: a no-op except under DeepSpeed ZeRO."""
        for weight, value in zip(self.factor_parameters(adapter_name), grads):
            if zero.is_zero_parameter(weight):
                zero.set_full_gradient(weight, value)

    def local_factor_shapes(self, adapter_name: str) -> tuple[torch.Size, torch.Size]:
        """Shapes of ``[A, B]`` as the schedule holds them (the local rows under FSDP2, else whole)."""
        shapes = []
        for factor, weight, mask in zip(
            ("lora_A", "lora_B"),
            self.factor_parameters(adapter_name),
            (self.lora_mask_A[adapter_name], self.lora_mask_B[adapter_name]),
        ):
            rows = None if zero.is_zero_parameter(weight) else self._factor_rows(adapter_name, factor, weight)
            shapes.append(mask[rows].shape if rows is not None else mask.shape)
        return shapes[0], shapes[1]

    @torch.no_grad()
    def set_masks(self, adapter_name: str, mask_a_rows: torch.Tensor, mask_b_rows: torch.Tensor) -> None:
        """Store new masks given as term rows (:meth:`term_rows`): ``(terms, n_a)`` and ``(terms, n_b)``."""
        mask_a, mask_b = self.from_term_rows(mask_a_rows, mask_b_rows)
        self.lora_mask_A[adapter_name].copy_(mask_a)
        self.lora_mask_B[adapter_name].copy_(mask_b)
        self.rose_masks_keep_all[adapter_name] = False

    def factors_and_masks(self, adapter_name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([A, B], [mask_A, mask_B])`` of ``adapter_name``, restricted to the rows this process holds under FSDP2
        (views: masking them in place masks the parameters); under DeepSpeed ZeRO ``A`` and ``B`` are whole fp32
        copies (collective), to be written back with :meth:`commit_factors`."""
        weights, masks = [], [self.lora_mask_A[adapter_name], self.lora_mask_B[adapter_name]]
        for index, (factor, weight) in enumerate(zip(("lora_A", "lora_B"), self.factor_parameters(adapter_name))):
            if zero.is_zero_parameter(weight):  # a whole fp32 copy: commit_factors() writes it back
                weights.append(zero.full_weight(weight))
                continue
            rows = self._factor_rows(adapter_name, factor, weight)
            if rows is not None:
                masks[index] = masks[index][rows]
            weights.append(sharding.local_tensor(weight))
        return weights, masks

    def apply_masks(self, adapter_name: str, clamp_value: Optional[float] = None) -> None:
        """Zero the pruned entries of both factors in place (exactly, also NaN or inf), then clamp them to
        ``[-clamp_value, clamp_value]``."""
        weights, masks = self.factors_and_masks(adapter_name)
        sparsity.apply_masks_(weights, masks, clamp_value)
        self.commit_factors(adapter_name, weights)
        self.mark_masked(adapter_name)

    def mark_masked(self, adapter_name: str) -> None:
        """Record that the factors are zero outside the masks as of now (their current version counters)."""
        self.rose_masked_versions[adapter_name] = self._factor_versions(adapter_name)


class Linear(RoseLoraLayer, LoraLinear):
    """RoseLoRA on ``torch.nn.Linear`` and ``transformers.pytorch_utils.Conv1D`` (``fan_in_fan_out``) bases."""

    def __repr__(self) -> str:
        return "roselora." + LoraLinear.__repr__(self)[len("lora.") :]


class _MaskedBeforeUseLayer(RoseLoraLayer):
    """RoseLoRA on PEFT LoRA layers that run LoRA's own forward and merge code (no ``LoraVariant``): the factors are
    made exactly zero outside their masks before PEFT reads them (:meth:`ensure_masked`, a version-counter check when
    nothing changed), so LoRA's code computes RoseLoRA's output and merged update; the masks are created with each
    adapter. Gradients are those of the zeroed factors, as in the variant-based ``Linear``."""

    def resolve_lora_variant(self, *, config, **kwargs) -> Optional[LoraVariant]:
        return None  # LoRA's own code paths, on masked factors

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, *args, **kwargs)
        if adapter_name in self.lora_A or adapter_name in getattr(self, "lora_embedding_A", {}):
            self.init_rose_state(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.disable_adapters and not self.merged:
            for adapter_name in self.lora_mask_A:
                if (
                    self.training
                    and adapter_name in self.active_adapters
                    and adapter_name not in self.rose_masked_versions
                    and torch.is_grad_enabled()
                ):
                    self.count_unscheduled_forward()
                self.ensure_masked(adapter_name)
        return super().forward(x, *args, **kwargs)


class Embedding(_MaskedBeforeUseLayer, LoraEmbedding):
    """RoseLoRA on ``torch.nn.Embedding``: ``lora_embedding_A`` ``(r, num_embeddings)`` (a row per term, over the
    vocabulary) and ``lora_embedding_B`` ``(embedding_dim, r)`` (a column per term)."""

    def factor_parameters(self, adapter_name: str) -> list[torch.Tensor]:
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def __repr__(self) -> str:
        return "roselora." + LoraEmbedding.__repr__(self)[len("lora.") :]


class _ConvNd(_MaskedBeforeUseLayer):
    """RoseLoRA on ``torch.nn.Conv1d`` / ``Conv2d`` / ``Conv3d``: ``lora_A`` is a convolution ``in -> r`` with the base
    kernel, weight ``(r, in, *kernel)``: the row of term ``i`` is its ``in * prod(kernel)`` entries. ``lora_B`` is a
    ``1x1`` convolution ``r -> out`` with the base layer's ``groups`` ``g``, weight ``(out, r / g, 1, ...)``: term
    ``i = j * (r / g) + c`` reaches only the ``out / g`` output channels of group ``j``, and those entries are its
    column (``out / g`` entries, pruned to ``ceil(tau * out / g)``)."""

    def _groups(self) -> int:
        return self.get_base_layer().groups

    @property
    def term_blocks(self) -> int:
        return self._groups()

    def effective_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """With ``groups > 1`` PEFT cannot merge (the update reaches every input channel, the base kernel only its
        group's): the update as the forward applies it, a dense kernel ``(out, in, *kernel)``."""
        if self._groups() == 1:
            return self.get_delta_weight(adapter_name)
        weight_a, weight_b = self.masked_factors(adapter_name)
        rows_a, rows_b = self.term_rows(weight_a, weight_b)
        delta = sparsity.blockwise_outer_sum(rows_a, rows_b, self._groups()) * self.scaling[adapter_name]
        return delta.reshape(weight_b.shape[0], *weight_a.shape[1:])

    term_dims = None  # terms laid out otherwise: see term_rows

    def term_rows(self, tensor_a: torch.Tensor, tensor_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self._groups()
        out_channels, ranks_per_group = tensor_b.shape[0], tensor_b.shape[1]
        rows_b = (
            tensor_b.reshape(groups, out_channels // groups, ranks_per_group)
            .permute(0, 2, 1)
            .reshape(groups * ranks_per_group, out_channels // groups)
        )
        return tensor_a.reshape(tensor_a.shape[0], -1), rows_b

    def from_term_rows(self, rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self._groups()
        ranks, per_group = rows_b.shape
        shape_a, shape_b = self._factor_shapes(ranks)
        mask_b = rows_b.reshape(groups, ranks // groups, per_group).permute(0, 2, 1).reshape(shape_b)
        return rows_a.reshape(shape_a), mask_b

    def _factor_shapes(self, ranks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.get_base_layer()
        kernel = tuple(base.weight.shape[2:])
        ones = (1,) * len(kernel)
        return (ranks, base.in_channels, *kernel), (base.out_channels, ranks // base.groups, *ones)

    def __repr__(self) -> str:
        return "roselora." + super().__repr__()[len("lora.") :]


class Conv1d(_ConvNd, LoraConv1d):
    """RoseLoRA on ``torch.nn.Conv1d`` (see :class:`_ConvNd` for rows and columns)."""


class Conv2d(_ConvNd, LoraConv2d):
    """RoseLoRA on ``torch.nn.Conv2d`` (see :class:`_ConvNd` for rows and columns)."""


class Conv3d(_ConvNd, LoraConv3d):
    """RoseLoRA on ``torch.nn.Conv3d`` (see :class:`_ConvNd` for rows and columns)."""


class MultiheadAttention(_MaskedBeforeUseLayer, LoraMultiheadAttention):
    """RoseLoRA on ``torch.nn.MultiheadAttention``: ``in_proj`` gets ``lora_A`` ``(r, embed)`` / ``lora_B``
    ``(3 * embed, r)`` like a ``Linear``, and ``out_proj`` is a RoseLoRA :class:`Linear` (its own masks and
    schedule entry). PEFT merges both into the attention's weights around every forward; the factors are masked
    before that."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        # PEFT wraps out_proj in its own LoRA Linear: RoseLoRA's takes its place (same base layer and adapter)
        lora_out_proj = self.base_layer.out_proj
        self.base_layer.out_proj = Linear(
            lora_out_proj.get_base_layer(), adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs
        )

    def _rose_device(self) -> torch.device:
        return self.get_base_layer().in_proj_weight.device

    def __repr__(self) -> str:
        return "roselora." + LoraMultiheadAttention.__repr__(self)[len("lora.") :]


class ParamWrapper(_MaskedBeforeUseLayer, LoraParamWrapper):
    """RoseLoRA on a bare ``nn.Parameter`` (``target_parameters``), 2-D or with a leading expert dimension ``E``.

    PEFT holds the factors of all experts in one ``lora_A`` ``(E * r, in)`` and one ``lora_B`` ``(out, E * r)``; the
    term of expert ``e`` and rank ``j`` uses row ``e * r + j`` of ``lora_A`` and column ``j * E + e`` of ``lora_B``
    (PEFT's layout). Every expert's update is the sum of its own ``r`` sparse terms, so each expert's delta has
    density at most ``r * tau^2``."""

    def _rose_device(self) -> torch.device:
        return self.get_param().device

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        # PEFT moves every per-adapter tensor to the parameter's dtype: masks stay bool
        for store in (getattr(self, "lora_mask_A", {}), getattr(self, "lora_mask_B", {})):
            if adapter_name in store and store[adapter_name].dtype != torch.bool:
                store[adapter_name] = store[adapter_name].bool()

    term_dims = None  # terms laid out otherwise: see term_rows

    def term_rows(self, tensor_a: torch.Tensor, tensor_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self.num_experts
        columns = tensor_b.T  # (E * r, out), column j * E + e at row j * E + e
        ranks = columns.shape[0] // experts
        return tensor_a, columns.reshape(ranks, experts, -1).transpose(0, 1).reshape(experts * ranks, -1)

    def from_term_rows(self, rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self.num_experts
        ranks = rows_b.shape[0] // experts
        columns = rows_b.reshape(experts, ranks, -1).transpose(0, 1).reshape(experts * ranks, -1)
        return rows_a, columns.T

    @property
    def term_blocks(self) -> int:
        return self.num_experts

    def get_delta_factors(self, adapter_name):
        self.ensure_masked(adapter_name)
        return super().get_delta_factors(adapter_name)

    def __repr__(self) -> str:
        return "roselora." + LoraParamWrapper.__repr__(self)[len("lora.") :]


def dispatch_param_wrapper(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for a parameter named in ``target_parameters``; None for a module target."""
    if kwargs.get("parameter_name") is None:
        return None
    return ParamWrapper(target, adapter_name, config=lora_config, **kwargs)


def dispatch_default(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for a plain ``Embedding``, ``Conv1d/2d/3d``, ``MultiheadAttention``, ``Linear`` or
    transformers ``Conv1D`` target (``fan_in_fan_out`` corrected to the layer type, with a warning); None for any
    other."""
    from transformers.pytorch_utils import Conv1D

    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    target_name = kwargs.get("target_name", "<unknown>")
    typed_layers = (
        (torch.nn.Embedding, Embedding),
        (torch.nn.Conv1d, Conv1d),
        (torch.nn.Conv2d, Conv2d),
        (torch.nn.Conv3d, Conv3d),
        (torch.nn.MultiheadAttention, MultiheadAttention),
    )
    for base_type, rose_type in typed_layers:
        if isinstance(base_layer, base_type):
            return rose_type(target, adapter_name, config=lora_config, **kwargs)
    if isinstance(base_layer, torch.nn.Linear):
        if lora_config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but '{target_name}' is a torch.nn.Linear: using False.", stacklevel=2)
            lora_config.fan_in_fan_out = False
        return Linear(target, adapter_name, config=lora_config, **kwargs)
    if isinstance(base_layer, Conv1D):
        if not lora_config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out=False but '{target_name}' is a transformers Conv1D: using True.", stacklevel=2
            )
            lora_config.fan_in_fan_out = True
        return Linear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
    return None
