"""TRL SFTTrainer with RoseLoRA (peft_config=RoseLoraConfig, RoseLoraCallback), TRL defaults on, also QLoRA."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl  # noqa: F401  (part of the dev extra: a missing install fails, never skips)

from peft_roselora import RoseLoraCallback, RoseLoraLayer  # noqa: E402


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_trl.py"


def _example():
    spec = importlib.util.spec_from_file_location("sft_trl_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "load_in_4bit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["bf16-base", "qlora-4bit"]
)
def test_sft_trainer_reaches_target_sparsity(tmp_path, load_in_4bit):
    trainer = _example().build_trainer(
        max_steps=30, keep_ratio=0.25, load_in_4bit=load_in_4bit, output_dir=str(tmp_path)
    )
    assert trainer.args.gradient_checkpointing  # TRL's default: every adapter forward runs twice
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RoseLoraCallback))
    trainer.train()
    model = trainer.model
    assert callback.optimizer_steps == 30 and model.steps_taken() == 30
    report = model.sparsity_report()
    assert report.keep_ratio_reached == pytest.approx(0.25) and report.within_bounds
    layers = [m for m in model.modules() if isinstance(m, RoseLoraLayer)]
    assert layers
    schedule = model.base_model.adapter_schedule("default")
    assert {ema.dtype for ema in schedule.importance_A.values()} == {torch.float32}
    for layer in layers:
        assert layer.lora_mask_A["default"].dtype == torch.bool
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_sft_example_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-steps", "20", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "sparsity_report.json").read_text())
    assert summary["keep_ratio_reached"] == pytest.approx(0.25) and summary["within_bounds"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
