"""Compact RoseLoRA adapter files: only the kept entries of each factor (values and indices), safetensors only.

Opt-in; the default stays PEFT's dense ``adapter_model.safetensors`` so that every PEFT tool reads it. Every row of
``lora_A`` and every column of ``lora_B`` keeps the same number of entries after pruning, so each factor is stored as
two regular ``(rows, kept)`` tensors: the kept values and their positions in the row (int16 when the row is shorter
than 32768 entries). Factors whose rows keep different counts (e.g. combined adapters) are stored densely with their
masks. Loading rebuilds identical weights and masks.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from .config import RoseLoraConfig
from .training import get_roselora_model


COMPACT_WEIGHTS_NAME = "adapter_model.compact.safetensors"
FORMAT = "roselora-compact-v1"
_MASK_OF = {"lora_A.weight": "lora_mask_A", "lora_B.weight": "lora_mask_B"}


def _encode_factor(weight: torch.Tensor, mask: torch.Tensor, rows_are_columns: bool) -> Optional[dict]:
    rows_weight = weight.T if rows_are_columns else weight
    rows_mask = mask.T if rows_are_columns else mask
    kept = rows_mask.sum(dim=1)
    if not bool((kept == kept[0]).all()):
        return None
    keep = int(kept[0])
    index_dtype = torch.int16 if rows_mask.shape[1] < 2**15 else torch.int32
    # positions of the kept entries in every row, in ascending order (stable: True sorts first when descending)
    positions = torch.sort(rows_mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :keep]
    positions = positions.sort(dim=1).values
    return {"values": rows_weight.gather(1, positions).contiguous(), "indices": positions.to(index_dtype).contiguous()}


def save_compact(model: torch.nn.Module, save_directory: str, adapter_name: str = "default") -> dict[str, int]:
    """Write ``adapter_name`` in the compact format: ``adapter_config.json`` and ``adapter_model.compact.safetensors``.

    Returns:
        dict[str, int]: ``{"compact_bytes": ..., "dense_bytes": ...}``, the sizes of the compact file and of the
        tensors the dense ``adapter_model.safetensors`` holds (weights and masks).

    Raises:
        ValueError: if ``adapter_name`` is not a RoseLoRA adapter of ``model``.
    """
    tuner = get_roselora_model(model)
    if not isinstance(tuner.peft_config.get(adapter_name), RoseLoraConfig):
        raise ValueError(f"`adapter_name` must name a RoseLoRA adapter of the model, got {adapter_name!r}.")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors, layout = {}, {}
    for key, value in state.items():
        suffix = next((s for s in _MASK_OF if key.endswith(s)), None)
        if suffix is None:
            if not any(key.endswith(m) for m in _MASK_OF.values()):
                tensors[key] = value.contiguous()
            continue
        mask_key = key[: -len(suffix)] + _MASK_OF[suffix]
        encoded = _encode_factor(value, state[mask_key], rows_are_columns=suffix.startswith("lora_B"))
        if encoded is None:  # irregular rows: store dense with its mask
            tensors[key], tensors[mask_key] = value.contiguous(), state[mask_key].contiguous()
            continue
        tensors[f"{key}::values"], tensors[f"{key}::indices"] = encoded["values"], encoded["indices"]
        layout[key] = list(value.shape)
    os.makedirs(save_directory, exist_ok=True)
    tuner.peft_config[adapter_name].save_pretrained(save_directory)
    path = os.path.join(save_directory, COMPACT_WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": FORMAT, "layout": json.dumps(layout)})
    dense = sum(v.numel() * v.element_size() for v in state.values())
    return {"compact_bytes": os.path.getsize(path), "dense_bytes": dense}


def load_compact_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Read a compact file back into the dense PEFT state dict (factors and masks), exactly as it was saved.

    Raises:
        ValueError: if the file is not in the compact format.
    """
    path = os.path.join(directory, COMPACT_WEIGHTS_NAME)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a RoseLoRA compact adapter (format {metadata.get('format')!r}).")
        layout = json.loads(metadata["layout"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for key, shape in layout.items():
        values, indices = tensors[f"{key}::values"], tensors[f"{key}::indices"].long()
        suffix = next(s for s in _MASK_OF if key.endswith(s))
        rows_are_columns = suffix.startswith("lora_B")
        rows_shape = (shape[1], shape[0]) if rows_are_columns else tuple(shape)
        weight = torch.zeros(rows_shape, dtype=values.dtype).scatter_(1, indices, values)
        mask = torch.zeros(rows_shape, dtype=torch.bool).scatter_(1, indices, True)
        state[key] = weight.T.contiguous() if rows_are_columns else weight
        state[key[: -len(suffix)] + _MASK_OF[suffix]] = mask.T.contiguous() if rows_are_columns else mask
    return state


def load_compact(
    base_model: torch.nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False
):
    """Load a compact adapter onto ``base_model``: the ``PeftModel`` ``PeftModel.from_pretrained`` would give for the
    dense files (identical weights and masks)."""
    config = PeftConfig.from_pretrained(directory)
    if not isinstance(config, RoseLoraConfig):
        raise ValueError(f"{directory} does not hold a RoseLoRA adapter config (peft_type {config.peft_type}).")
    config.inference_mode = not is_trainable
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, load_compact_state_dict(directory), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if adapter_name in k and "lora_" in k]
    if missing:
        raise ValueError(f"compact adapter in {directory} lacks tensors for {missing[:3]}...")
    if not is_trainable:
        model.eval()
    return model
