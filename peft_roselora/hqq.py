"""RoseLoRA on HQQ-quantized bases (``hqq.core.quantize.HQQLinear``).

PEFT's ``HqqLoraLinear`` dispatches forward, merge (dequantize, add, re-quantize) and unmerge to the adapter's
``LoraVariant``, like its bitsandbytes layers; this class adds the RoseLoRA state and variant.
"""

from __future__ import annotations

import torch
from peft.import_utils import is_hqq_available
from peft.tuners.tuners_utils import BaseTunerLayer

from .bnb import _QuantizedRoseLoraLayer


if is_hqq_available():
    from hqq.core.quantize import HQQLinear
    from peft.tuners.lora.hqq import HqqLoraLinear as LoraHqqLinear

    class HqqLinear(_QuantizedRoseLoraLayer, LoraHqqLinear):
        """RoseLoRA on ``hqq.core.quantize.HQQLinear``."""

        def _rose_device(self) -> torch.device:
            return self.get_base_layer().W_q.device


def dispatch_hqq(target: torch.nn.Module, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for an ``HQQLinear`` target; None for any other."""
    if not is_hqq_available():
        return None
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base_layer, HQQLinear):
        return None
    return HqqLinear(base_layer, adapter_name, config=lora_config, **kwargs)
