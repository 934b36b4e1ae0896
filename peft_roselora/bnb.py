"""RoseLoRA on bitsandbytes 8-bit and 4-bit bases.

PEFT's bitsandbytes LoRA layers already dispatch forward, mixed-batch forward, merge (into the quantized weight) and
unmerge to the adapter's ``LoraVariant``; these classes only add the RoseLoRA state and variant.
"""

from __future__ import annotations

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer

from .layer import RoseLoraLayer


class _QuantizedRoseLoraLayer(RoseLoraLayer):
    def cast_merged_weight(self, merged: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
        return merged  # re-quantized by the caller from the promoted dtype, as PEFT LoRA does


if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    class Linear8bitLt(_QuantizedRoseLoraLayer, LoraLinear8bitLt):
        """RoseLoRA on ``bitsandbytes.nn.Linear8bitLt``."""


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class Linear4bit(_QuantizedRoseLoraLayer, LoraLinear4bit):
        """RoseLoRA on ``bitsandbytes.nn.Linear4bit`` (QLoRA); merging re-quantizes, as PEFT LoRA does."""


def dispatch_bnb_8bit(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for a ``bitsandbytes.nn.Linear8bitLt`` target; None for any other."""
    if not is_bnb_available():
        return None
    import bitsandbytes as bnb

    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base_layer, bnb.nn.Linear8bitLt):
        return None
    kwargs.update(
        has_fp16_weights=base_layer.state.has_fp16_weights,
        threshold=base_layer.state.threshold,
        index=base_layer.index,
    )
    return Linear8bitLt(target, adapter_name, config=lora_config, **kwargs)


def dispatch_bnb_4bit(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for a ``bitsandbytes.nn.Linear4bit`` target; None for any other."""
    if not is_bnb_4bit_available():
        return None
    import bitsandbytes as bnb

    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base_layer, bnb.nn.Linear4bit):
        return None
    kwargs.update(
        compute_dtype=base_layer.compute_dtype,
        compress_statistics=base_layer.weight.compress_statistics,
        quant_type=base_layer.weight.quant_type,
    )
    return Linear4bit(target, adapter_name, config=lora_config, **kwargs)
