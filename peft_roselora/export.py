"""Export a RoseLoRA adapter as a plain LoRA adapter that stock PEFT loads without this package."""

from __future__ import annotations

import dataclasses
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from .config import RoseLoraConfig
from .layer import FACTOR_MASK_KEYS, mask_key_of
from .training import get_roselora_model


def export_to_lora(model: torch.nn.Module, save_directory: str, adapter_name: str = "default") -> LoraConfig:
    """Write ``adapter_name`` of ``model`` as a plain PEFT LoRA adapter (``adapter_config.json`` with
    ``"peft_type": "LORA"`` and ``adapter_model.safetensors`` without masks).

    The masks are multiplied into the factors, so a stock ``PeftModel.from_pretrained`` of the exported folder gives
    exactly the outputs of the RoseLoRA adapter.

    Args:
        model (nn.Module): a ``PeftModel`` with RoseLoRA adapters.
        save_directory (str): target folder (created if missing).
        adapter_name (str): the adapter to export.

    Returns:
        LoraConfig: the config written.

    Raises:
        ValueError: if ``adapter_name`` is not a RoseLoRA adapter of ``model``.
    """
    tuner = get_roselora_model(model)
    config = tuner.peft_config.get(adapter_name)
    if not isinstance(config, RoseLoraConfig):
        raise ValueError(f"`adapter_name` must name a RoseLoRA adapter of the model, got {adapter_name!r}.")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    exported = {}
    mask_keys = set(FACTOR_MASK_KEYS.values())
    for key, value in state_dict.items():
        mask_key = mask_key_of(key)
        if mask_key is not None:
            exported[key] = value.masked_fill(~state_dict[mask_key], 0)
        elif not key.endswith(tuple(mask_keys)):
            exported[key] = value
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"}
    lora_config = LoraConfig(**{name: getattr(config, name) for name in lora_fields})
    os.makedirs(save_directory, exist_ok=True)
    lora_config.save_pretrained(save_directory)
    save_file(
        {k: v.contiguous() for k, v in exported.items()},
        os.path.join(save_directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return lora_config
