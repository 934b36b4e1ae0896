"""Smoke runs of the benchmarks: they complete and write their JSON (no timing asserts: timings live in docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
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


ZSRE = Path(__file__).resolve().parent / "fixtures" / "zsre_sample.json"  # 12 real records + 1 malformed


@pytest.mark.slow
def test_editing_benchmark_quick(tmp_path):
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
        "--limit",
        "13",  # the 12 valid records and the malformed one
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["records"] == 12 and set(summary["methods"]) == {"roselora", "lora", "adalora", "ft-l"}
    assert [row["record"] for row in summary["rejected"]] == [12]  # the shipped malformed record is reported
    for method in summary["methods"].values():
        for name in ("reliability", "generalization", "locality"):
            records = [row[name] for row in method["records"] if row.get(name) is not None]
            assert method["summary"][name] == pytest.approx(sum(records) / len(records))


def test_editing_benchmark_loads_the_hub_zsre_file_through_datasets(monkeypatch):
    import importlib.util

    import datasets

    spec = importlib.util.spec_from_file_location("editing_benchmark_run", BENCHMARKS / "editing" / "run.py")
    editing_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(editing_run)

    records = json.loads(ZSRE.read_text())
    calls = []

    def fake_load_dataset(path, data_files, split):
        calls.append((path, data_files, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = editing_run.load_records(None, limit=5)
    assert calls == [
        ("json", "hf://datasets/wangzn2001/Model_Editing_Hurt/training-data/zsre_mend_eval.json", "train")
    ]
    assert [r.prompt for r in loaded.requests] == [r["src"] for r in records[:5]]

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="wangzn2001/Model_Editing_Hurt.*pass --data FILE"):
        editing_run.load_records(None, limit=None)
    with pytest.raises(FileNotFoundError, match="--data /nonexistent.json: no such file"):
        editing_run.load_records("/nonexistent.json", limit=None)
