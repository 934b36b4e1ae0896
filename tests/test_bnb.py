"""bitsandbytes 4-bit and 8-bit bases on CPU: train a few steps, save, reload, merge."""

from __future__ import annotations

import bitsandbytes as bnb  # part of the dev extra: a missing install fails, never skips
import pytest
import torch
from conftest import make_tiny_llama, random_batch, trained_roselora
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peft_roselora  # noqa: E402
from peft_roselora import RoseLoraLayer  # noqa: E402


QUANTIZATIONS = {
    "4bit-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "4bit-fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_tiny_llama(hidden_size=128).save_pretrained(path)
    return path


def _load(base_dir, quantization):
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=QUANTIZATIONS[quantization], dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_quantized_base_train_save_reload_merge(quantization, base_dir, tmp_path):
    expected_layer = bnb.nn.Linear4bit if quantization.startswith("4bit") else bnb.nn.Linear8bitLt
    model = trained_roselora(_load(base_dir, quantization), ["q_proj", "v_proj", "up_proj"], steps=6)
    layers = [m for m in model.modules() if isinstance(m, RoseLoraLayer)]
    assert layers and all(isinstance(m.get_base_layer(), expected_layer) for m in layers)
    assert {type(m).__name__ for m in layers} == {"Linear4bit" if quantization.startswith("4bit") else "Linear8bitLt"}
    report = model.sparsity_report()
    assert report.keep_ratio_reached == pytest.approx(0.25) and report.within_bounds

    ids = random_batch(7)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_load(base_dir, quantization), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)

    # Merge a freshly loaded copy: on CPU, bitsandbytes 0.50 repacks a 4-bit weight at its first forward pass and
    # PEFT's dequantize_bnb_weight then misreads it, for plain LoRA as much as for RoseLoRA (docs/usage.md,
    # "Quantized bases").
    merged = PeftModel.from_pretrained(_load(base_dir, quantization), tmp_path).merge_and_unload()
    assert not any(isinstance(m, RoseLoraLayer) for m in merged.modules())
    assert any(isinstance(m, expected_layer) for m in merged.modules())  # still quantized: merged into the base
    # merging re-quantizes the weight exactly as PEFT LoRA does: the same adapter exported as plain LoRA and merged by
    # stock PEFT into the same quantized base gives the same model
    peft_roselora.export_to_lora(model, tmp_path / "lora")
    lora_merged = PeftModel.from_pretrained(_load(base_dir, quantization), tmp_path / "lora").merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        assert torch.allclose(merged_logits, lora_merged(input_ids=ids).logits, atol=1e-6)
    # and the re-quantized merge stays close to the adapted outputs (closer than the base model is)
    assert (merged_logits - adapted).abs().mean() < 0.5 * (base_logits - adapted).abs().mean()
