"""RoseLoRA on torchao-quantized bases (int8 weight-only ``Int8WeightOnlyConfig``, the quantization PEFT LoRA
supports for torchao).

PEFT's ``TorchaoLoraLinear`` is its LoRA ``Linear`` (forward dispatched to the adapter's ``LoraVariant``) whose
merge and unmerge dequantize the weight, add ``get_delta_weight`` and re-quantize; RoseLoRA's ``get_delta_weight`` is
the masked update, so this class only adds the RoseLoRA state and variant.
"""

from __future__ import annotations

from peft.import_utils import is_torchao_available
from peft.tuners.tuners_utils import BaseTunerLayer

from .bnb import _QuantizedRoseLoraLayer


if is_torchao_available():
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    class TorchaoLinear(_QuantizedRoseLoraLayer, TorchaoLoraLinear):
        """RoseLoRA on a ``torch.nn.Linear`` whose weight is a torchao tensor subclass (int8 weight-only)."""


def is_torchao_weight(module) -> bool:
    """Whether ``module`` holds a torchao-quantized ``weight`` (checked without importing torchao when absent)."""
    if not is_torchao_available() or not hasattr(module, "weight"):
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(module.weight, TorchAOBaseTensor)


def dispatch_torchao(target, adapter_name: str, lora_config, **kwargs):
    """The RoseLoRA layer for a target whose weight is a torchao tensor; None for any other."""
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_torchao_weight(base_layer):
        return None
    return TorchaoLinear(target, adapter_name, config=lora_config, **kwargs)
