"""Client-side scenarios for tests/test_hub.py, run in fresh processes whose HF_ENDPOINT points at the local Hub
(``huggingface_hub`` reads its endpoint when imported, so this cannot run inside the pytest process)."""

from __future__ import annotations

import json
import sys
import warnings

import torch
from conftest import make_tiny_llama, random_batch, train_steps
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft_roselora
from peft_roselora import RoseLoraConfig


def _trained(base_dir: str):
    make_tiny_llama().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # loaded from disk: _name_or_path is a local path
    config = RoseLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        keep_ratio=0.25,
        prune_start_step=2,
        prune_end_step=6,
        total_step=8,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, 8)
    return model


def push(base_dir: str, repo_id: str, expected_path: str, base_model: str | None) -> None:
    model = _trained(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = {} if base_model is None else {"base_model": base_model}
        model.push_to_hub(repo_id, **kwargs)
    local_path_warnings = [w for w in caught if "is not a Hub model id" in str(w.message)]
    with torch.no_grad():
        logits = model(input_ids=random_batch(99)).logits
    masks = {k: v for k, v in model.state_dict().items() if "lora_mask" in k}
    save_file({"logits": logits, **masks}, expected_path)
    print(json.dumps({"local_path_warnings": len(local_path_warnings)}))


def load(base_dir: str, repo_id: str, expected_path: str) -> None:
    expected = load_file(expected_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo_id).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(repo_id).eval()
    for loaded in (model, auto):
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=random_batch(99)).logits, expected["logits"])
        state = loaded.state_dict()
        for key, mask in expected.items():
            if "lora_mask" in key:
                assert torch.equal(state[key], mask), key
    print(json.dumps({"loaded": True}))


def trainer_push(base_dir: str, repo_id: str, output_dir: str) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    make_tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), RoseLoraConfig(r=4, target_modules=["q_proj"], keep_ratio=0.25)
    )
    ids = random_batch(0, batch=32).tolist()
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        push_to_hub=True,
        hub_model_id=repo_id,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[peft_roselora.RoseLoraCallback()],
    )
    trainer.train()
    peft_roselora.push_trainer_to_hub(trainer, base_model="meta-llama/Llama-2-7b-hf")
    print(json.dumps({"pushed": True}))


if __name__ == "__main__":
    scenario, *arguments = sys.argv[1:]
    arguments = [None if a == "-" else a for a in arguments]
    {"push": push, "load": load, "trainer_push": trainer_push}[scenario](*arguments)
