"""RoseLoRA on HQQ-quantized bases (``hqq.core.quantize.HQQLinear``).

PEFT's ``HqqLoraLinear`` dispatches forward, merge (dequantize, add, re-quantize) and unmerge to the adapter's
``LoraVariant``, like its bitsandbytes layers; this class adds the RoseLoRA state and variant.
"""

from __future__ import annotations

import torch
from peft.import_utils import is_hqq_available

from .bnb import _QuantizedRoseLoraLayer


if is_hqq_available():
    from hqq.core.quantize import HQQLinear  # noqa: F401  (re-exported for the dispatch in model.py)
    from peft.tuners.lora.hqq import HqqLoraLinear as LoraHqqLinear

    class HqqLinear(_QuantizedRoseLoraLayer, LoraHqqLinear):
        """RoseLoRA on ``hqq.core.quantize.HQQLinear``."""

        def _rose_device(self) -> torch.device:
            return self.get_base_layer().W_q.device
