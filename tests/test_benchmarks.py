"""Smoke runs of the benchmarks: they complete and write their JSON (no timing asserts: timings live in docs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


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
    assert set(summary["step_ratio_to_lora_paired"]) == methods
    assert set(summary["memory"]) == {
        "lora",
        "roselora-decay",
        "roselora-decay-bf16-importance",
        "roselora-final-persistent",
        "adalora",
    }
    assert "memory_persistent_after_tf_in_fp32_adapter_copies" in summary
    assert "memory_bf16_importance_in_fp32_adapter_copies" in summary
    assert len(summary["schedule_scaling"]) == 6


ZSRE = Path(__file__).resolve().parent / "fixtures" / "zsre_sample.json"  # 12 real records + 1 malformed


@pytest.mark.slow
def test_autoload_startup_benchmark_smoke(tmp_path):
    output = tmp_path / "autoload.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "autoload_startup.py"),
            "--runs",
            "2",
            "--commands",
            "start",
            "stdlib",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert {"start", "stdlib"} <= set(summary) and summary["start"]["hook_off_median_s"] > 0


@pytest.mark.slow
def test_fsdp2_step_benchmark_smoke(tmp_path):
    # 2 real processes (gloo): every method runs sharded, the schedule's collectives are counted; no timing asserts
    output = tmp_path / "fsdp2_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(BENCHMARKS / "fsdp2_step.py"), "--preset", "smoke", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"lora", "roselora-decay", "roselora-final", "roselora-final-persistent"}
    assert report["world_size"] == 2 and report["modules"] == 14
    # the importance gather: r * (in + out) fp32 values per module and selection, half of them from the other process
    assert rows["roselora-decay"]["bytes_received_per_step_per_module"] > 0
    assert rows["roselora-final-persistent"]["collectives_per_step"] < rows["roselora-decay"]["collectives_per_step"]


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
        "--split",
        "test",  # records 0, 2, 7, 8, 10 of the fixture (tests/test_editing.py pins the split)
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["records_loaded"] == 12 and summary["split"] == "test" and summary["records"] == 5
    assert set(summary["methods"]) == {"roselora", "lora", "adalora", "ft-l", "memit", "alphaedit"}
    for method in summary["methods"].values():
        assert [row["record_ids"] for row in method["records"]] == [[0], [2], [7], [8], [10]]
    assert [row["record"] for row in summary["rejected"]] == [12]  # the shipped malformed record is reported
    for method in summary["methods"].values():
        for name in ("reliability", "generalization", "locality"):
            records = [row[name] for row in method["records"] if row.get(name) is not None]
            assert method["summary"][name] == pytest.approx(sum(records) / len(records))


@pytest.mark.slow
def test_edit_cost_benchmark_quick(tmp_path):
    """benchmarks/editing/edit_cost.py --quick: single and many-edit sequential edits timed in one process."""
    output = tmp_path / "cost.json"
    command = [sys.executable, str(BENCHMARKS / "editing" / "edit_cost.py"), "--quick", "--data", str(ZSRE)]
    command += ["--cache-dir", str(tmp_path / "cache"), "--output", str(output)]
    command += ["--replay-score-limit", "1", "--preserve-tokens", "4", "--many-edit-every", "2"]  # the bounded mode
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=BENCHMARKS / "editing")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    bounded = {"replay_score_limit": 1, "preserve_tokens": 4, "many_edit_every": 2}
    assert {key: report["many_edit"][key] for key in bounded} == bounded
    assert len(report["single_seconds"]) == len(report["sequential_seconds"]) == 2
    assert all(seconds > 0 for seconds in report["single_seconds"] + report["sequential_seconds"])
    assert report["ratio"] == pytest.approx(report["sequential_median_s"] / report["single_median_s"])
    assert "ratio" in result.stdout


@pytest.mark.slow
def test_editing_protocol_quick_search_batch_sequential_and_resume(tmp_path):
    """CI's quick version of each mode: the dev search, batch editing and sequential editing (resumed)."""

    def run(script, *options, returncode=0):
        command = [sys.executable, str(BENCHMARKS / "editing" / script), "--quick", "--data", str(ZSRE)]
        command += ["--cache-dir", str(tmp_path / "cache"), *options]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=BENCHMARKS / "editing")
        assert result.returncode == returncode, result.stderr[-3000:]
        return result.stdout if returncode == 0 else result.stderr

    methods = ["roselora", "memit", "alphaedit"]
    assert "{'--test-chunk': 0} must each be >= 1" in run("search.py", "--test-chunk", "0", returncode=2)
    chunked = ["--test-chunk", "2", "--output", str(tmp_path / "search.json")]
    run("search.py", "--methods", *methods, "--test-records", "4", *chunked)
    rows = (tmp_path / "search.jsonl").read_text().splitlines()
    assert [json.loads(row)["start"] for row in rows if json.loads(row)["phase"] == "test"] == [0, 2] * len(methods)
    # a larger --test-records extends the report: only the new chunk of each method is edited
    run("search.py", "--methods", *methods, *chunked)
    search = json.loads((tmp_path / "search.json").read_text())
    new_rows = [json.loads(row) for row in (tmp_path / "search.jsonl").read_text().splitlines()[len(rows) :]]
    assert search["test_records"] in (5, 6)  # the quick split: 4 earlier records, one more chunk of 1 or 2
    assert [(r["phase"], r["start"], r["records"]) for r in new_rows] == [("test", 4, search["test_records"] - 4)] * 3
    for name in methods:
        data = search["methods"][name]
        assert len(data["dev"]) == 2 and data["chosen_config"] in [p["config"] for p in data["dev"]]
        assert data["chosen_test"]["records"] == search["test_records"] and data["frontier_test"]
        assert data["chosen_test"]["chunks"] == 3
    run(
        "batch.py",
        "--methods",
        *methods,
        "--configs",
        str(tmp_path / "search.json"),
        "--output",
        str(tmp_path / "b.json"),
    )
    batch = json.loads((tmp_path / "b.json").read_text())
    for name in methods:
        sizes = batch["methods"][name]["sizes"]
        assert sizes["all"]["edits"] == batch["test_records"] and sizes["all"]["batches"] == 1
        assert sizes["1"]["edits"] == sizes["1"]["batches"] == 2
    sequence = ["roselora+many", "roselora+shared", "alphaedit"]
    options = ["--methods", *sequence, "--set", "keep_ratio=0.3", "--configs", str(tmp_path / "search.json")]
    options.append("--output")
    run("sequential.py", *options, str(tmp_path / "s.json"))
    first = json.loads((tmp_path / "s.json").read_text())
    for name in sequence:
        points = first["methods"][name]["checkpoints"]
        assert [p["edits"] for p in points] == [2, first["edits"]]
        assert all(0 <= p["retention"] <= 1 and p["changed_weights"] > 0 for p in points)
    shared = first["methods"]["roselora+shared"]
    assert shared["config"]["keep_ratio"] == 0.3 and shared["config"]["shared_adapter"]
    # resume: the saved state after the last checkpoint is picked up, nothing is edited again
    (tmp_path / "s.json").unlink()
    assert "resumed after" in run("sequential.py", *options, str(tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["methods"] == first["methods"]
    assert first["edit_seed"] == 0  # --seed's default
    # the saved state belongs to edit seed 0: resuming it under another edit seed is refused, naming both
    refused = run("sequential.py", *options, str(tmp_path / "s.json"), "--edit-seed", "7", returncode=2)
    assert "--edit-seed 7" in refused and "edit seed 0" in refused
    # a state saved before edit seeds were recorded ran under --seed (0): also refused under edit seed 7
    (tmp_path / "s.state" / "edit_seed.json").unlink()
    refused = run("sequential.py", *options, str(tmp_path / "s.json"), "--edit-seed", "7", returncode=2)
    assert "--edit-seed 7" in refused and "edit seed 0" in refused
    # a hand grid on the dev records, and (--split test) a configuration chosen there reported on the test records
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{}, {"method": "alphaedit", "l2": 1.0}]))
    for split in ("dev", "test"):
        run("dev_probe.py", "--grid", str(grid), "--records", "2", "--split", split, "--output", str(tmp_path / "p"))
    rows = [json.loads(line) for line in (tmp_path / "p").read_text().splitlines()]
    assert [(row["split"], row["method"], row["records"]) for row in rows] == [
        ("dev", "roselora", 2),
        ("dev", "alphaedit", 2),
        ("test", "roselora", 2),
        ("test", "alphaedit", 2),
    ]
    assert rows[0]["config"] == {} and rows[1]["config"] == {"l2": 1.0}
    assert rows[0]["reliability"] is not None and rows[2]["locality"] is not None


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


@pytest.mark.slow
def test_gpu_check_kit_runs_on_cpu_quick(tmp_path):
    """benchmarks/gpu/check.py --device cpu --quick (CI's run of the GPU kit): every check reported, the CUDA-only
    ones with the reason they did not run."""
    command = [sys.executable, str(BENCHMARKS / "gpu" / "check.py"), "--device", "cpu", "--quick"]
    result = subprocess.run(command + ["--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    [timing] = report["step_time"].values()
    assert set(timing["ratio_to_lora"]) == {"lora", "roselora", "adalora"} and timing["ratio_to_lora"]["lora"] == 1
    assert report["compile"]["ok"] and report["qlora"]["ok"] and report["qlora"]["keep_ratio"] == 0.25
    assert (
        report["cuda_kernels"] == {"skipped": "needs CUDA"} and "needs CUDA" in report["fp16_grad_scaler"]["skipped"]
    )
    assert all(rows["growth"] == 0 for rows in report["dispatch"]["phases"].values())
    assert "| step time, tiny Llama" in (tmp_path / "check.md").read_text()
    refused = subprocess.run(command[:2] + ["--output-dir", str(tmp_path)], capture_output=True, text=True)
    if not torch.cuda.is_available():
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr


def _benchmark_module(relative: str):
    """A benchmark script imported as a module (its folder first on ``sys.path``, for its sibling imports; the sibling
    modules are dropped from ``sys.modules`` again, so another folder's ``run.py`` is not shadowed)."""
    import importlib.util

    path = BENCHMARKS / relative
    before = set(sys.modules)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"{path.stem}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        for name in set(sys.modules) - before:
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent == path.parent:
                del sys.modules[name]
    return module


def test_search_merges_test_chunks_weighted_by_the_records_each_covers():
    search = _benchmark_module("editing/search.py")
    base = {"phase": "test", "method": "m", "config": {}, "steps": 10.0, "changed_fraction_of_adapted": 0.1}
    first = {**base, "start": 0, "records": 3, "reliability": 1.0, "generalization": 0.5, "locality": 0.9}
    first |= {"changed_fraction_of_all": 0.01, "seconds_per_edit": 2.0}  # an early row: no "counts"
    second = {**base, "start": 3, "records": 1, "reliability": 0.0, "generalization": None, "locality": 0.5}
    second |= {"changed_fraction_of_all": 0.05, "seconds_per_edit": 6.0}
    second["counts"] = {"reliability": 1, "generalization": 0, "locality": 1}
    merged = search.merge_chunks([first, second])
    assert merged["records"] == 4 and merged["chunks"] == 2 and "start" not in merged
    assert merged["reliability"] == pytest.approx(0.75) and merged["locality"] == pytest.approx(0.8)
    assert merged["generalization"] == pytest.approx(0.5)  # the record without a rephrase does not count
    assert merged["seconds_per_edit"] == pytest.approx(3.0) and merged["changed_fraction_of_all"] == pytest.approx(
        0.02
    )
    assert search.merge_chunks([first]) == {**{k: v for k, v in first.items() if k != "start"}, "chunks": 1}
    with pytest.raises(ValueError, match=r"chunk starts \[0, 4\] are not consecutive"):
        search.merge_chunks([first, {**second, "start": 4}])
    with pytest.raises(ValueError, match="no rows"):
        search.merge_chunks([])


def test_forgetting_benchmark_keeps_earlier_runs_only_with_the_same_settings(tmp_path, capsys):
    forgetting = _benchmark_module("finetune/forgetting.py")
    settings = {name: index for index, name in enumerate(forgetting.SETTINGS)}
    runs = [{"method": method, "seed": seed} for method in ("lora", "roselora") for seed in (0, 1)]
    path = tmp_path / "forgetting.json"
    assert forgetting.earlier_runs(path, settings, set()) == []  # no earlier report
    path.write_text(json.dumps({**settings, "runs": runs}))
    kept = forgetting.earlier_runs(path, settings, {("lora", 1), ("full", 0)})
    assert kept == [runs[0], runs[2], runs[3]]  # the run measured again is dropped
    assert [(run["method"], run["seed"]) for run in forgetting.ordered(kept)] == [("roselora", 0), ("roselora", 1)] + [
        ("lora", 0)
    ]
    other = {**settings, "steps": 999}
    assert forgetting.earlier_runs(path, other, set()) == []
    assert "'steps': (" in capsys.readouterr().err  # the replaced file's differing setting is named
    path.write_text(json.dumps({"runs": runs}))  # not this script's report
    with pytest.raises(ValueError, match="is not a report of forgetting.py"):
        forgetting.earlier_runs(path, settings, set())
