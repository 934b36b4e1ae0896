"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_roselora  # noqa: F401  (registers RoseLoRA with PEFT)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*gemm_4bit.*")

VOCAB_SIZE = 128


def make_tiny_llama(seed: int = 0, hidden_size: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def lora_state(model) -> dict[str, torch.Tensor]:
    """Copies of every adapter tensor of ``model`` (factors and masks), by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_adapter_state(actual: dict, expected: dict) -> None:
    """Exact resume: the same keys, masks equal, factors within 1e-6."""
    assert actual.keys() == expected.keys()
    for key in expected:
        if "mask" in key:
            assert torch.equal(actual[key], expected[key]), key
        else:
            assert torch.allclose(actual[key], expected[key], atol=1e-6, rtol=0), key


def token_dataset(rows: int = 64, length: int = 16, seed: int = 0):
    """A ``datasets.Dataset`` of random token rows with ``input_ids`` and ``labels`` (causal LM) for the Trainer."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_SIZE, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def trainer_args(output_dir, **overrides):
    """Deterministic CPU ``TrainingArguments`` for tiny Trainer runs (20 steps, constant lr 1e-2, no saving)."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=20,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def random_batch(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)


def train_steps(model, optimizer, steps: int, seed: int = 0) -> None:
    """Run ``steps`` causal-LM steps on random tokens; the schedule is driven by whatever hooks are attached."""
    model.train()
    for step in range(steps):
        input_ids = random_batch(seed + step)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trained_roselora(base, targets, steps: int = 8, seed: int = 0, adapter_name: str = "default", **config):
    """``base`` with a RoseLoRA adapter trained for ``steps`` steps on random tokens, the schedule driven by optimizer
    hooks; ``config`` overrides the small defaults (r 4, alpha 8, keep ratio 0.25, t_i = steps // 4,
    t_f = 3 * steps // 4, T = steps)."""
    from peft import get_peft_model

    settings = dict(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        keep_ratio=0.25,
        prune_start_step=steps // 4,
        prune_end_step=3 * steps // 4,
        total_step=steps,
    )
    settings.update(config)
    model = get_peft_model(base, peft_roselora.RoseLoraConfig(**settings), adapter_name=adapter_name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    peft_roselora.register_optimizer_hooks(model, optimizer)
    train_steps(model, optimizer, steps, seed=seed)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()
