"""Real 2-process DDP on CPU (gloo) through the Trainer: identical masks and adapter weights on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer_ddp.py"


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        "--cpu",
        "--max-steps",
        "12",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2, schedule step 12" in result.stdout
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any("lora_mask_A" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    masks = [v for k, v in rank0.items() if "lora_mask_A" in k]
    assert all((m.float().mean(dim=1) == 0.25).all() for m in masks)  # the target keep ratio, on every rank
