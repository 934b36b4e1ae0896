"""Smoke runs of the benchmarks: they complete and write their JSON (no timing asserts: timings live in docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_train_step_benchmark_smoke(tmp_path):
    output = tmp_path / "train_step.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_step.py"), "--preset", "smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    methods = {"lora", "roselora-decay", "roselora-final", "roselora-final-persistent", "adalora"}
    assert set(summary["step_seconds_median"]) == methods
    assert set(summary["memory"]) == {"lora", "roselora-decay", "adalora"}
    assert len(summary["schedule_scaling"]) == 6
