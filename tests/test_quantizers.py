"""RoseLoRA on quantized bases beyond bitsandbytes, run for real on CPU: torchao int8 weight-only (loaded through
transformers' ``TorchAoConfig``, so merging re-quantizes) and HQQ 4-bit (``HQQLinear``). Each: the schedule prunes,
save / load is exact, and merging into the quantized weight equals PEFT LoRA's merge of the same adapter exported to
plain LoRA, bit for bit (both re-quantize the same sum)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from conftest import VOCAB_SIZE, make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import peft_roselora
from peft_roselora import RoseLoraConfig, register_optimizer_hooks


TARGETS = ["q_proj", "v_proj", "down_proj"]
# these packages are in the dev extra and the CI lock: a missing one is a broken environment, not a skip
for _package in ("torchao", "hqq"):
    assert importlib.util.find_spec(_package) is not None, f"{_package} is in the dev extra; pip install -e '.[dev]'"


def _torchao_base(folder):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
        )


def _hqq_base(folder):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = make_tiny_llama()
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "q_proj"), (layer.self_attn, "v_proj"), (layer.mlp, "down_proj")):
            quantized = HQQLinear(
                getattr(parent, name),
                BaseQuantizeConfig(nbits=4, group_size=32),
                compute_dtype=torch.float32,
                device="cpu",
            )
            setattr(parent, name, quantized)
    return model


BASES = {"torchao-int8": (_torchao_base, "TorchaoLinear"), "hqq-4bit": (_hqq_base, "HqqLinear")}


@pytest.mark.parametrize("quantizer", list(BASES))
def test_quantized_base_trains_saves_loads_and_merges_like_lora(quantizer, tmp_path):
    build, layer_class = BASES[quantizer]
    make_tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(
        build(tmp_path / "base"),
        RoseLoraConfig(
            r=4, keep_ratio=0.3, total_step=6, prune_start_step=1, prune_end_step=4, target_modules=TARGETS
        ),
    )
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    register_optimizer_hooks(model, optimizer)
    ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    report = model.base_model.sparsity_report()
    assert report.within_bounds and report.keep_ratio_reached == pytest.approx(0.3125)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(build(tmp_path / "base"), tmp_path / "adapter").eval()
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        merged = loaded.merge_and_unload()(input_ids=ids).logits
        assert torch.allclose(merged, expected, atol=0.1)  # re-quantized: rounding only
        peft_roselora.export_to_lora(model, tmp_path / "lora")
        plain = PeftModel.from_pretrained(build(tmp_path / "base"), tmp_path / "lora").eval()
        assert isinstance(plain.peft_config["default"], LoraConfig)
        assert not isinstance(plain.peft_config["default"], RoseLoraConfig)
        assert torch.equal(plain(input_ids=ids).logits, expected)
        assert torch.equal(plain.merge_and_unload()(input_ids=ids).logits, merged)
