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
