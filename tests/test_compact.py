"""The compact adapter format: exact round trip of weights and masks, size close to the kept fraction."""

from __future__ import annotations

import os

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
