"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


# ---- real multi-process runs of the examples (FSDP2, DeepSpeed) ------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: Path, processes: int, output: Path, *options: str) -> dict:
    """Run ``script`` in ``processes`` processes (plain python for one) and return its result.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    if processes == 1:
        command = [sys.executable, str(script)]
    else:  # --standalone: the rendezvous binds a port the OS picks, no race with other runs
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command.append(str(script))
    command += ["--output-dir", str(output), *options]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((output / "result.json").read_text())


def assert_same_masked_adapter(actual_dir: Path, expected_dir: Path, atol: float = 1e-5) -> None:
    """Masks identical, factors within ``atol`` (the issue's criterion)."""
    actual = load_file(actual_dir / "adapter.safetensors")
    expected = load_file(expected_dir / "adapter.safetensors")
    assert actual.keys() == expected.keys()
    assert any("lora_mask_B" in key for key in expected)
    for key in expected:
        if "lora_mask" in key:
            assert torch.equal(actual[key], expected[key]), key
        else:
            assert torch.allclose(actual[key], expected[key], atol=atol, rtol=0), key


def assert_same_trajectory_up_to_near_ties(
    actual_trace: Path, expected_trace: Path, steps: int, atol: float = 1e-5, tie_rtol: float = 1e-4
) -> Optional[int]:
    """Step by step (``--trace`` folders of ``examples/fsdp2_custom_loop.py``; the expected one from one process,
    with its importance EMAs): masks identical and factors within ``atol``, until the first step whose masks differ.
    There every differing entry must be a near-tie of the expected selection, its score within ``tie_rtol`` of the
    lowest kept score of its row of ``lora_A`` (column of ``lora_B``): another reduction order (ZeRO-3 reduces and
    computes in a different order than one process, ~1e-7 per step) may decide such a tie the other way, and the runs
    then legitimately part. Returns that step, or None when the masks agree at every step.

    Raises:
        AssertionError: factors apart before any tie, or a mask entry that differs without being a near-tie.
    """
    for step in range(1, steps + 1):
        actual = load_file(actual_trace / f"step{step}.safetensors")
        expected = load_file(expected_trace / f"step{step}.safetensors")
        masks = [key for key in expected if "lora_mask" in key]
        assert masks and all(key in actual for key in masks), step
        differing = [key for key in masks if not torch.equal(actual[key], expected[key])]
        if not differing:
            for key in expected:
                if key.endswith((".lora_A", ".lora_B")):
                    assert torch.allclose(actual[key], expected[key], atol=atol, rtol=0), (step, key)
            continue
        for key in differing:
            module, factor = key.rsplit(".lora_mask_", 1)
            scores, kept, other = expected[f"importance_{factor}.{module}"], expected[key], actual[key]
            if factor == "B":  # the columns of lora_B as rows
                scores, kept, other = scores.T, kept.T, other.T
            lowest_kept = torch.where(kept, scores, torch.inf).min(dim=1, keepdim=True).values
            flipped = kept != other
            gap = ((scores - lowest_kept).abs() / lowest_kept)[flipped]
            assert (gap <= tie_rtol).all(), f"step {step}, {key}: masks differ beyond a near-tie (gaps {gap.tolist()})"
        return step
    return None


def assert_every_rank_has_the_same_masks(output: Path, processes: int) -> None:
    first = load_file(output / "masks_rank0.safetensors")
    for rank in range(1, processes):
        other = load_file(output / f"masks_rank{rank}.safetensors")
        assert all(torch.equal(first[key], other[key]) for key in first)


# ---- a 2-layer Llama with a word-level tokenizer that knows one fact (the editing tests) ----------------------


WORDS = (
    "[PAD] [UNK] the capital of france is paris rome italy berlin germany who wrote hamlet shakespeare "
    "dickens what city a an river flows through"
).split()


@pytest.fixture(scope="module")
def tiny_lm():
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(WORDS),
        )
    )
    # teach it one fact, so that the edit has something to overwrite
    ids = torch.tensor([tokenizer("the capital of france is paris")["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer
