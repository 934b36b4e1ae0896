"""The compact adapter format: exact round trip of weights and masks, size close to the kept fraction."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, random_batch, trained_roselora

import peft_roselora
from peft_roselora.compact import COMPACT_WEIGHTS_NAME


def _trained(factory, targets, keep_ratio):
    return trained_roselora(factory(), targets, steps=4, keep_ratio=keep_ratio, lora_bias=True)


@pytest.mark.parametrize("keep_ratio", [0.05, 0.25])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compact_round_trip_is_exact(tmp_path, kind, keep_ratio):
    factory, targets = {
        "llama": (make_tiny_llama, ["q_proj", "down_proj"]),
        "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"]),
    }[kind]
    model = _trained(factory, targets, keep_ratio)
    sizes = peft_roselora.save_compact(model, tmp_path)
    loaded = peft_roselora.load_compact(factory(), tmp_path)
    original, restored = model.state_dict(), loaded.state_dict()
    keys = [k for k in original if "lora_" in k]
    assert keys and any("lora_mask_B" in k for k in keys) and any("lora_B.default.bias" in k for k in keys)
    for key in keys:
        assert torch.equal(original[key], restored[key]), key
    with torch.no_grad():
        assert torch.equal(model(input_ids=random_batch(5)).logits, loaded(input_ids=random_batch(5)).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert sizes["compact_bytes"] == os.path.getsize(tmp_path / COMPACT_WEIGHTS_NAME)
    assert sizes["compact_bytes"] < sizes["dense_bytes"]


def test_compact_load_rejects_other_files(tmp_path):
    model = _trained(make_tiny_llama, ["q_proj"], 0.25)
    model.save_pretrained(tmp_path)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / COMPACT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="is not a RoseLoRA compact adapter"):
        peft_roselora.load_compact(make_tiny_llama(), tmp_path)


# ---- hostile files: every load is bit-exact or a clear error, with bounded memory -----------------------------------

import json  # noqa: E402
import resource  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peft_roselora.compact import CompactFormatError  # noqa: E402


@pytest.fixture(scope="module")
def compact_original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compact_original")
    model = _trained(make_tiny_llama, ["q_proj", "down_proj"], 0.25)
    peft_roselora.save_compact(model, folder)
    with safe_open(str(folder / COMPACT_WEIGHTS_NAME), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    expected = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    return folder, tensors, metadata, expected


def _mutate(tensors, metadata, kind, pick, row):
    tensors = {k: v.clone() for k, v in tensors.items()}
    metadata = dict(metadata)
    layout = json.loads(metadata["layout"])
    factor = sorted(layout)[pick % len(layout)]
    values, indices = f"{factor}::values", f"{factor}::indices"
    row = row % tensors[indices].shape[0]
    if kind == "none":
        pass
    elif kind == "bool_indices":
        tensors[indices] = tensors[indices].bool()
    elif kind == "float_indices":
        tensors[indices] = tensors[indices].float()
    elif kind == "int_values":
        tensors[values] = tensors[values].to(torch.int32)
    elif kind == "bool_values":
        tensors[values] = tensors[values] != 0
    elif kind == "duplicate_index":
        tensors[indices][row, -1] = tensors[indices][row, 0]
    elif kind == "adjacent_duplicate_index":  # still non-decreasing: only a strict check refuses it
        tensors[indices][row, 1] = tensors[indices][row, 0]
    elif kind == "index_too_large":
        tensors[indices][row, -1] = layout[factor][1 if "lora_A" in factor else 0]
    elif kind == "negative_index":
        tensors[indices][row, 0] = -1
    elif kind == "fewer_index_columns":
        tensors[indices] = tensors[indices][:, :-1].contiguous()
    elif kind == "fewer_rows":
        tensors[indices] = tensors[indices][:-1].contiguous()
        tensors[values] = tensors[values][:-1].contiguous()
    elif kind == "huge_declared_shape":
        rank_first = "lora_A" in factor  # keep the stored rows consistent: only the row length grows
        layout[factor] = [layout[factor][0], 10**9] if rank_first else [10**9, layout[factor][1]]
    elif kind == "smaller_declared_shape":
        layout[factor] = [layout[factor][0], layout[factor][1] - 1]
    elif kind == "missing_tensor":
        del tensors[values]
    elif kind == "extra_tensor":
        tensors["base_model.model.other.lora_A.weight::values"] = tensors[values].clone()
    elif kind == "unsorted_indices":
        tensors[indices][row] = tensors[indices][row].flip(0)
        tensors[values][row] = tensors[values][row].flip(0)
    elif kind == "layout_not_json":
        metadata["layout"] = "{not json"
    metadata["layout"] = metadata["layout"] if kind == "layout_not_json" else json.dumps(layout)
    return tensors, metadata


KINDS = [
    "none", "bool_indices", "float_indices", "int_values", "bool_values", "duplicate_index",
    "adjacent_duplicate_index", "index_too_large",
    "negative_index", "fewer_index_columns", "fewer_rows", "huge_declared_shape", "smaller_declared_shape",
    "missing_tensor", "extra_tensor", "unsorted_indices", "layout_not_json",
]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), pick=st.integers(0, 7), row=st.integers(0, 200))
def test_mutated_compact_files_load_exactly_or_raise_with_bounded_memory(compact_original, tmp_path, kind, pick, row):
    _load_mutant(compact_original, tmp_path, kind, pick, row)


@pytest.mark.parametrize("kind", KINDS)
def test_every_mutation_kind_is_refused_and_the_original_loads_exactly(compact_original, tmp_path, kind):
    _load_mutant(compact_original, tmp_path, kind, 1, 2)


def _load_mutant(compact_original, tmp_path, kind, pick, row):
    folder, tensors, metadata, expected = compact_original
    import tempfile

    target = Path(tempfile.mkdtemp(dir=tmp_path))
    (target / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    mutated, mutated_metadata = _mutate(tensors, metadata, kind, pick, row)
    save_file(mutated, str(target / COMPACT_WEIGHTS_NAME), metadata=mutated_metadata)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        loaded = peft_roselora.load_compact(make_tiny_llama(), target)
    except CompactFormatError:
        assert kind != "none"
    else:
        assert kind == "none", f"mutation {kind} loaded silently"
        restored = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert restored.keys() == expected.keys()
        assert all(torch.equal(restored[k], expected[k]) for k in expected)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KiB: no big allocation


def test_standalone_reader_bounds_declared_shapes_by_max_dense_bytes(compact_original, tmp_path):
    _, tensors, metadata, _ = compact_original
    mutated, mutated_metadata = _mutate(tensors, metadata, "huge_declared_shape", 0, 0)
    save_file(mutated, str(tmp_path / COMPACT_WEIGHTS_NAME), metadata=mutated_metadata)
    with pytest.raises(CompactFormatError, match=r"declares shape \[4, 1000000000\] .* above max_dense_bytes"):
        peft_roselora.compact.load_compact_state_dict(str(tmp_path))


@pytest.mark.parametrize("where", ["values", "dense"])
def test_a_compact_file_with_a_non_finite_value_is_refused_naming_the_tensor(compact_original, tmp_path, where):
    _, tensors, metadata, _ = compact_original
    tensors = {key: value.clone() for key, value in tensors.items()}
    if where == "values":
        key = sorted(k for k in tensors if k.endswith("::values"))[0]
    else:  # a float tensor stored as it is (a bias)
        key = sorted(k for k in tensors if "::" not in k and tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = float("inf") if where == "dense" else float("nan")
    save_file(tensors, str(tmp_path / COMPACT_WEIGHTS_NAME), metadata=metadata)
    with pytest.raises(CompactFormatError, match=re.escape(f"'{key}' holds NaN or inf values")):
        peft_roselora.compact.load_compact_state_dict(str(tmp_path))
