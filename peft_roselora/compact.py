"""Compact RoseLoRA adapter files: only the kept entries of each factor (values and indices), safetensors only.

Opt-in; the default stays PEFT's dense ``adapter_model.safetensors`` so that every PEFT tool reads it. Every row of
``lora_A`` and every column of ``lora_B`` keeps the same number of entries after pruning, so each factor is stored as
two regular ``(rows, kept)`` tensors: the kept values and their positions in the row (int16 when the row is shorter
than 32768 entries). Factors whose rows keep different counts (e.g. combined adapters) are stored densely with their
masks. Loading rebuilds identical weights and masks.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from .config import RoseLoraConfig
from .layer import FACTOR_MASK_KEYS, factor_rows, mask_key_of
from .training import get_roselora_model


COMPACT_WEIGHTS_NAME = "adapter_model.compact.safetensors"
FORMAT = "roselora-compact-v1"


def _encode_factor(weight: torch.Tensor, mask: torch.Tensor, key: str) -> Optional[dict]:
    rows_weight, rows_mask = factor_rows(weight, key), factor_rows(mask, key)
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
        mask_key = mask_key_of(key)
        if mask_key is None:
            if not key.endswith(tuple(FACTOR_MASK_KEYS.values())):
                tensors[key] = value.contiguous()
            continue
        encoded = _encode_factor(value, state[mask_key], key)
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


class CompactFormatError(ValueError):
    """A compact adapter file that does not hold exactly what ``save_compact`` writes (names the tensor and why)."""


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INDEX_DTYPES = {"I16", "I32", "I64"}
# without the model's shapes to check against, a file may not declare factors larger than this when made dense
DEFAULT_MAX_DENSE_BYTES = 2**31


def load_compact_state_dict(
    directory: str,
    expected_shapes: Optional[dict[str, tuple[int, ...]]] = None,
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
) -> dict[str, torch.Tensor]:
    """Read a compact file back into the dense PEFT state dict (factors and masks), exactly as it was saved.

    Everything is validated from the file's header before any tensor is read or any dense factor is allocated:
    the format tag and layout, the key set, dtypes (values floating point, indices int16/32/64, masks bool), value
    and index shapes against each other and against the declared shapes, the declared shapes against
    ``expected_shapes`` (the model's) or, without them, against ``max_dense_bytes``. The index tensors are then
    checked to lie in range and to be strictly increasing in every row (no duplicates), as ``save_compact`` writes
    them. A load is therefore either bit-exact or a ``CompactFormatError``.

    Args:
        directory (str): folder holding ``adapter_model.compact.safetensors``.
        expected_shapes (dict[str, tuple] | None): state-dict key -> shape the model expects for it.
        max_dense_bytes (int): bound on one dense factor's bytes when ``expected_shapes`` is not given.

    Raises:
        CompactFormatError: anything that is not exactly what ``save_compact`` writes (names the tensor).
        FileNotFoundError: if the file is missing.
    """
    path = os.path.join(directory, COMPACT_WEIGHTS_NAME)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CompactFormatError(f"{path} is not a RoseLoRA compact adapter (format {metadata.get('format')!r}).")
        layout = _read_layout(path, metadata)
        headers = {
            key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape())) for key in handle.keys()
        }
        plans = _check_headers(path, layout, headers, expected_shapes, max_dense_bytes)
        state = {}
        for key in headers:
            if "::" not in key:
                state[key] = handle.get_tensor(key)
                if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
                    raise CompactFormatError(f"{path}: '{key}' holds NaN or inf values (a saved factor never does).")
        for key, (rows_shape, shape) in plans.items():
            values, indices = handle.get_tensor(f"{key}::values"), handle.get_tensor(f"{key}::indices").long()
            if not bool(torch.isfinite(values).all()):
                raise CompactFormatError(
                    f"{path}: '{key}::values' holds NaN or inf values (RoseLoRA keeps its factors finite: the file is "
                    "corrupt)."
                )
            if bool((indices < 0).any()) or bool((indices >= rows_shape[1]).any()):
                raise CompactFormatError(f"{path}: '{key}::indices' has positions outside 0..{rows_shape[1] - 1}.")
            if indices.shape[1] > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
                raise CompactFormatError(
                    f"{path}: '{key}::indices' is not strictly increasing in every row (duplicate or unsorted "
                    "positions)."
                )
            weight = torch.zeros(shape, dtype=values.dtype)
            mask = torch.zeros(shape, dtype=torch.bool)
            # factor_rows() is a view of the dense tensor: scattering into it fills the factor and its mask
            factor_rows(weight, key).scatter_(1, indices, values)
            factor_rows(mask, key).scatter_(1, indices, True)
            state[key], state[mask_key_of(key)] = weight, mask
    return state


def _read_layout(path: str, metadata: dict) -> dict[str, tuple[int, ...]]:
    try:
        layout = json.loads(metadata.get("layout", ""))
    except json.JSONDecodeError as error:
        raise CompactFormatError(f"{path}: metadata 'layout' is not JSON ({error}).") from None
    if not isinstance(layout, dict):
        raise CompactFormatError(f"{path}: metadata 'layout' must map factor keys to shapes.")
    checked = {}
    for key, shape in layout.items():
        if mask_key_of(key) is None:
            raise CompactFormatError(f"{path}: layout key '{key}' is not a lora_A / lora_B weight.")
        if (
            not isinstance(shape, list)
            or not 2 <= len(shape) <= 5
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
        ):
            raise CompactFormatError(f"{path}: layout shape of '{key}' must be 2 to 5 integers >= 1, got {shape!r}.")
        checked[key] = tuple(shape)
    return checked


def _check_headers(path, layout, headers, expected_shapes, max_dense_bytes) -> dict:
    """Validate every tensor header against the layout; returns ``key -> (rows shape, rows_are_columns)``."""
    plans = {}
    encoded = {key for key in headers if "::" in key}
    wanted = {f"{key}::{part}" for key in layout for part in ("values", "indices")}
    if encoded != wanted:
        extra, missing = sorted(encoded - wanted), sorted(wanted - encoded)
        raise CompactFormatError(
            f"{path}: encoded tensors do not match the layout (extra {extra}, missing {missing})."
        )
    for key, shape in layout.items():
        mask_key = mask_key_of(key)
        if key in headers or mask_key in headers:
            raise CompactFormatError(f"{path}: '{key}' is stored both encoded and dense.")
        if expected_shapes is not None and tuple(expected_shapes.get(key, ())) != shape:
            raise CompactFormatError(
                f"{path}: '{key}' declares shape {list(shape)}, the model has {list(expected_shapes.get(key, ()))}."
            )
        values_dtype, values_shape = headers[f"{key}::values"]
        indices_dtype, indices_shape = headers[f"{key}::indices"]
        if values_dtype not in _FLOAT_DTYPES:
            raise CompactFormatError(f"{path}: '{key}::values' has dtype {values_dtype}, expected a float dtype.")
        if indices_dtype not in _INDEX_DTYPES:
            raise CompactFormatError(f"{path}: '{key}::indices' has dtype {indices_dtype}, expected int16/32/64.")
        rows_shape = tuple(factor_rows(torch.empty(shape, device="meta"), key).shape)
        if len(values_shape) != 2 or values_shape != indices_shape:
            raise CompactFormatError(
                f"{path}: '{key}' values {list(values_shape)} and indices {list(indices_shape)} must be equal 2-D "
                "shapes (rows, kept)."
            )
        if values_shape[0] != rows_shape[0] or not 1 <= values_shape[1] <= rows_shape[1]:
            raise CompactFormatError(
                f"{path}: '{key}' stores {list(values_shape)} (rows, kept) for declared shape {list(shape)}: expected "
                f"{rows_shape[0]} rows and 1..{rows_shape[1]} kept entries per row."
            )
        dense_bytes = math.prod(shape) * 8
        if expected_shapes is None and dense_bytes > max_dense_bytes:
            raise CompactFormatError(
                f"{path}: '{key}' declares shape {list(shape)} ({dense_bytes} bytes dense), above max_dense_bytes="
                f"{max_dense_bytes}; pass the model's shapes (load_compact does)."
            )
        plans[key] = (rows_shape, shape)
    for key, (dtype, shape) in headers.items():
        if "::" in key:
            continue
        if key.endswith(tuple(FACTOR_MASK_KEYS.values())) and dtype != "BOOL":
            raise CompactFormatError(f"{path}: mask '{key}' has dtype {dtype}, expected bool.")
        if expected_shapes is not None and tuple(expected_shapes.get(key, ())) != shape:
            raise CompactFormatError(
                f"{path}: '{key}' has shape {list(shape)}, the model has {list(expected_shapes.get(key, ()))}."
            )
    return plans


def load_compact(
    base_model: torch.nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False
):
    """Load a compact adapter onto ``base_model``: the ``PeftModel`` ``PeftModel.from_pretrained`` would give for the
    dense files (identical weights and masks).

    Raises:
        ValueError: if the folder holds no RoseLoRA config.
        CompactFormatError: if the file is not exactly what ``save_compact`` writes, or its shapes differ from the
            model's (checked before anything is allocated; see :func:`load_compact_state_dict`).
    """
    config = PeftConfig.from_pretrained(directory)
    if not isinstance(config, RoseLoraConfig):
        raise ValueError(f"{directory} does not hold a RoseLoRA adapter config (peft_type {config.peft_type}).")
    config.inference_mode = not is_trainable
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    expected = {
        key: tuple(value.shape) for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }
    state = load_compact_state_dict(directory, expected_shapes=expected)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if adapter_name in k and "lora_" in k]
    if missing:
        raise ValueError(f"compact adapter in {directory} lacks tensors for {missing[:3]}...")
    if not is_trainable:
        model.eval()
    return model
