"""The examples run end to end (the README's demo command and the custom accelerate loop)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = _run(str(EXAMPLES / "quickstart.py"), "--output-dir", str(tmp_path))
    assert "within bounds: True" in out and "keep ratio reached 0.1016 (target 0.1)" in out
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_custom_accelerate_loop_counts_optimizer_steps_not_micro_batches():
    out = _run(str(EXAMPLES / "custom_loop_accelerate.py"), "--steps", "30", "--accumulation", "3")
    assert "optimizer steps 30, keep ratio 0.250" in out


@pytest.mark.slow
def test_moe_qlora_with_expert_parameter_targets(tmp_path):
    """QLoRA-style: 4-bit linear layers, expert tensors adapted through target_parameters, reloaded in a process that
    does not import peft_roselora."""
    import json

    _run(str(EXAMPLES / "moe_qlora.py"), "--steps", "60", "--output-dir", str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["linear4bit_layers_in_base"] == 8  # q, k, v, o of both layers are bitsandbytes 4-bit
    assert result["experts_per_module"] == [4] and len(result["expert_modules"]) == 4  # 2 parameters x 2 layers
    assert result["keep_ratio_reached"] == 0.25 and result["within_bounds"]
    assert result["delta_density"] <= result["nominal_bound"]
    assert result["fresh_process_reload_max_logit_diff"] == 0.0
    assert result["accuracy_rule3_after"] > 0.8  # it learned the new rule through sparse adapters
