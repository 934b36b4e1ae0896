"""bitsandbytes 4-bit and 8-bit bases on CPU: train a few steps, save, reload, merge."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, random_batch, train_steps
from peft import PeftModel, get_peft_model


bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is part of the dev extra")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peft_roselora  # noqa: E402
from peft_roselora import RoseLoraConfig, RoseLoraLayer  # noqa: E402


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
    config = RoseLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        keep_ratio=0.25,
        prune_start_step=2,
        prune_end_step=5,
        total_step=6,
    )
    model = get_peft_model(_load(base_dir, quantization), config)
    layers = [m for m in model.modules() if isinstance(m, RoseLoraLayer)]
    assert layers and all(isinstance(m.get_base_layer(), expected_layer) for m in layers)
    assert {type(m).__name__ for m in layers} == {"Linear4bit" if quantization.startswith("4bit") else "Linear8bitLt"}

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 6)
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
