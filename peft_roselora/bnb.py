"""RoseLoRA on bitsandbytes 8-bit and 4-bit bases.

PEFT's bitsandbytes LoRA layers already dispatch forward, mixed-batch forward, merge (into the quantized weight) and
unmerge to the adapter's ``LoraVariant``; these classes only add the RoseLoRA state and variant.
"""

from __future__ import annotations

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available

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
