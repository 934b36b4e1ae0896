"""torch.compile: a RoseLoRA PeftModel compiles like PEFT LoRA (one graph, no graph break, no recompile over a
training run with the optimizer hooks) and trains to the same factors and masks as the eager model; the Trainer
with ``torch_compile=True`` too."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters

import peft_roselora
from peft_roselora import RoseLoraCallback, RoseLoraConfig


def _model(method: str):
    targets = ["q_proj", "v_proj"]
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    else:
        config = RoseLoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, keep_ratio=0.25, total_step=10,
            prune_start_step=2, prune_end_step=6,
        )  # fmt: skip
    return get_peft_model(make_tiny_llama(0), config)


def _train(method: str, compiled: bool, steps: int = 10):
    torch._dynamo.reset()
    counters.clear()
    model = _model(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if method == "roselora":
        peft_roselora.register_optimizer_hooks(model, optimizer)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(step))
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stats = {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
    }
    return model, stats


@pytest.mark.slow
def test_roselora_compiles_like_lora_and_trains_to_the_eager_result():
    _, lora = _train("lora", compiled=True)
    compiled, rose = _train("roselora", compiled=True)
    assert rose["graphs"] <= lora["graphs"] + 1 and rose["breaks"] <= lora["breaks"] + 1, (rose, lora)
    assert rose["recompiles"] == 0 and rose["graphs"] <= 2, rose
    eager, _ = _train("roselora", compiled=False)
    assert compiled.base_model.current_keep_ratio() == 0.25
    expected = {k: v for k, v in eager.state_dict().items() if "lora_" in k}
    for key, value in compiled.state_dict().items():
        if "lora_mask" in key:
            assert torch.equal(value, expected[key]), key
        elif "lora_" in key:
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_trainer_with_torch_compile_trains_roselora_as_without(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": list(range(i, i + 12)), "labels": list(range(i, i + 12))} for i in range(40)]

    def run(compile_model: bool, folder: str):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _model("roselora")
        arguments = TrainingArguments(
            output_dir=str(tmp_path / folder), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to="none", save_strategy="no", use_cpu=True, torch_compile=compile_model,
            torch_compile_backend="aot_eager" if compile_model else None, seed=0, data_seed=0,
        )  # fmt: skip
        Trainer(
            model=model, args=arguments, train_dataset=Dataset.from_list(rows), callbacks=[RoseLoraCallback()]
        ).train()
        return model

    compiled, eager = run(True, "compiled"), run(False, "eager")
    assert compiled.base_model.adapter_schedule().step == 10 and compiled.base_model.current_keep_ratio() == 0.25
    expected = eager.state_dict()
    for key, value in compiled.state_dict().items():
        if "lora_mask" in key:
            assert torch.equal(value, expected[key]), key
        elif "lora_" in key:
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
