"""The GLUE benchmark (benchmarks/glue): its metrics, its TSV reader and Hub loader, and a --quick run.

The quick run and the reader use the real GLUE lines shipped under tests/fixtures/glue (the first 24 rows of each
split); ``ROSELORA_DATA=DIR`` (CI: ../shared/data) also checks the full local copies in DIR/glue.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest


GLUE_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "glue"
GLUE_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"
sys.path.insert(0, str(GLUE_DIR))
from tasks import (  # noqa: E402
    TASKS,
    average_ranks,
    binary_f1,
    examples_from_hub_rows,
    load_split,
    matthews_correlation,
    pearson,
    read_split,
    spearman,
)


def full_glue_copy() -> Path:
    """``$ROSELORA_DATA/glue``: an explicit opt-in; when it is set the data must be there (no silent skip)."""
    root = os.environ.get("ROSELORA_DATA")
    if not root:
        pytest.skip("full GLUE copies are checked only with ROSELORA_DATA=DIR (CI sets it to ../shared/data)")
    folder = Path(root) / "glue"
    assert (folder / "RTE" / "dev.tsv").is_file(), f"ROSELORA_DATA={root} is set but {folder} holds no GLUE data"
    return folder


def test_matthews_and_f1_by_hand():
    predictions = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1, 0])
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3; F1 = 4 / (3 + 3)
    assert matthews_correlation(predictions, labels) == pytest.approx(1 / 3)
    assert binary_f1(predictions, labels) == pytest.approx(2 / 3)
    assert matthews_correlation(np.ones(4, dtype=int), np.array([1, 0, 1, 0])) == 0.0  # constant prediction


def test_ranks_share_ties_and_spearman_is_rank_pearson():
    assert average_ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, x**3) < 1.0
    assert spearman(x, -x) == pytest.approx(-1.0)
    # scipy's value for this tied example: 0.7631578947368421
    assert spearman(np.array([1, 2, 2, 3, 4]), np.array([2, 1, 3, 3, 5])) == pytest.approx(0.7631578947368421)


@pytest.mark.parametrize("task", list(TASKS))
def test_reader_on_the_shipped_fixtures(task):
    spec = TASKS[task]
    train_examples, dev_examples = read_split(GLUE_FIXTURES, spec, "train"), read_split(GLUE_FIXTURES, spec, "dev")
    assert (len(train_examples), len(dev_examples)) == (24, 24)
    assert all(e["text_a"] for e in train_examples + dev_examples)
    assert all((e["text_b"] is not None) == (spec.text_b is not None) for e in dev_examples)


def test_fixture_first_rows_read_exactly():
    # MRPC's header starts with a byte-order mark; CoLA has no header; RTE maps its label words
    mrpc = read_split(GLUE_FIXTURES, TASKS["MRPC"], "dev")[0]
    assert mrpc["label"] == 1 and mrpc["text_a"].startswith("He said the foodservice pie business")
    assert read_split(GLUE_FIXTURES, TASKS["CoLA"], "dev")[0] == {
        "text_a": "The sailors rode the breeze clear of the rocks.",
        "text_b": None,
        "label": 1,
    }
    rte = read_split(GLUE_FIXTURES, TASKS["RTE"], "dev")[0]
    assert rte["label"] == 1 and rte["text_b"] == "Christopher Reeve had an accident."
    assert read_split(GLUE_FIXTURES, TASKS["STS-B"], "dev")[0]["label"] == 5.0


def test_hub_rows_convert_to_the_reader_form_and_the_loader_asks_for_nyu_mll_glue(monkeypatch):
    import datasets

    rte_rows = datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1], "idx": [0, 1]}
    )
    assert examples_from_hub_rows(rte_rows, TASKS["RTE"]) == [
        {"text_a": "a", "text_b": "c", "label": 0},
        {"text_a": "b", "text_b": "d", "label": 1},
    ]
    stsb_rows = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.8], "idx": [0]})
    assert examples_from_hub_rows(stsb_rows, TASKS["STS-B"])[0]["label"] == pytest.approx(3.8)
    with pytest.raises(ValueError, match=r"labels \[-1\] outside 0..1"):  # the Hub's hidden test labels
        examples_from_hub_rows(datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]}), TASKS["SST-2"])

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence": ["x"], "label": [1], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split(TASKS["SST-2"], "dev") == [{"text_a": "x", "text_b": None, "label": 1}]
    assert calls == [("nyu-mll/glue", "sst2", "validation")]


def test_hub_loader_offline_names_the_dataset_and_the_data_option(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"GLUE CoLA \(nyu-mll/glue, config 'cola'.*pass --data DIR"):
        load_split(TASKS["CoLA"], "train")


@pytest.mark.parametrize(
    "task,train,dev",
    [("CoLA", 8551, 1043), ("MRPC", 3667, 408), ("RTE", 2490, 277), ("SST-2", 67349, 872), ("STS-B", 5749, 1500)],
)
def test_reader_counts_match_the_full_copies(task, train, dev):
    data = full_glue_copy()
    spec = TASKS[task]
    train_examples, dev_examples = read_split(data, spec, "train"), read_split(data, spec, "dev")
    assert (len(train_examples), len(dev_examples)) == (train, dev)
    labels = [e["label"] for e in train_examples]
    if spec.is_regression:
        assert 0.0 <= min(labels) and max(labels) <= 5.0
    else:
        assert set(labels) == {0, 1}
    assert all(e["text_a"] for e in dev_examples)
    assert all((e["text_b"] is not None) == (spec.text_b is not None) for e in dev_examples)


def test_reader_names_file_and_line_of_a_bad_row(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n"
    )
    with pytest.raises(ValueError, match=r"dev.tsv:3: malformed row for task RTE"):
        read_split(tmp_path, TASKS["RTE"], "dev")
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        read_split(tmp_path, TASKS["RTE"], "train")


@pytest.mark.slow
def test_quick_run_completes_and_accounts_parameters(tmp_path):
    output = tmp_path / "glue_quick"
    command = [sys.executable, str(GLUE_DIR / "run.py"), "--quick", "--cache-dir", str(tmp_path / "cache")]
    command += ["--data", str(GLUE_FIXTURES)]
    result = subprocess.run(command + ["--output", str(output)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert (
        output.with_suffix(".png").stat().st_size > 0 and "| roselora-0.1 |" in output.with_suffix(".md").read_text()
    )
    per_task = report["summary"]["per_task"]
    assert set(per_task) == set(TASKS)
    assert all(
        set(cells) == {"full", "lora", "adalora", "roselora-0.1", "roselora-0.3"} for cells in per_task.values()
    )
    assert set(report["learning_rates"]) == {"full", "lora", "adalora", "roselora"}
    for cells in per_task.values():
        for entry in cells.values():
            assert math.isfinite(entry["main"]["mean"]) and math.isfinite(entry["forgetting"]["mean"])
        # the footprint is structural, whatever the scores: Proposition 1 bounds RoseLoRA's merged delta
        # (r = 8, keep ceil(0.1 * n) of n per factor line: at most 8 * (39/384) * (39/384) for 384-wide matrices)
        assert cells["roselora-0.1"]["merged_delta_density"]["mean"] <= 8 * (39 / 384) ** 2
        assert cells["lora"]["merged_delta_density"]["mean"] > 0.9
        assert cells["full"]["trainable_params"]["mean"] > 20_000_000
        assert (
            cells["roselora-0.1"]["nonzero_trained_params"]["mean"] < cells["lora"]["nonzero_trained_params"]["mean"]
        )
        assert (
            cells["roselora-0.1"]["changed_base_weights"]["mean"]
            < cells["roselora-0.3"]["changed_base_weights"]["mean"]
        )
    assert 0.5 < report["base_sts_spearman"] < 1.0  # the pretrained sentence encoder's zero-shot skill


def test_per_task_budgets_are_part_of_the_cell_key_not_of_the_cache_folder():
    import run

    cpu = run.PRESETS["cpu"]
    assert cpu.for_task("CoLA") == (None, 1.5) and cpu.for_task("RTE") == (2000, 1.5)
    assert run.PRESETS["quick"].for_task("CoLA") == (48, 1)  # no override: the defaults
    longer_mrpc = replace(cpu, per_task={**cpu.per_task, "MRPC": (None, 2.0)})
    # changing one task's budget keeps the folder (the other tasks' cells stay valid) and renames that task's cells
    assert longer_mrpc.shared_fingerprint() == cpu.shared_fingerprint()
    keys = [run.cell_key(b, "MRPC", "lora", 0, 1e-3) for b in (cpu, longer_mrpc)]
    assert keys == ["MRPC-nall-e1_lora_s0_lr0.001", "MRPC-nall-e2_lora_s0_lr0.001"]
    rte = {run.cell_key(b, "RTE", "full", 1, 2e-5) for b in (cpu, longer_mrpc)}
    assert rte == {"RTE-n2000-e1.5_full_s1_lr2e-05"}
    # a shared setting (batch size) changes the folder; the seeds do not (each cell's key names its seed)
    assert replace(cpu, batch_size=16).shared_fingerprint() != cpu.shared_fingerprint()
    assert replace(cpu, seeds=(3,)).shared_fingerprint() == cpu.shared_fingerprint()


def test_bad_seeds_and_learning_rates_are_refused_naming_the_option(capsys):
    import run

    with pytest.raises(SystemExit):
        run.main(["--seeds", "-1", "--model", "unused", "--report-only"])
    assert "--seeds [-1]: seeds must be non-negative integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--learning-rates: unknown method family 'dora'"):
        run.parse_learning_rates("full=5e-5,dora=1e-3")
    for bad in ("lora=-1e-3", "lora=fast", "lora"):
        with pytest.raises(ValueError, match=f"--learning-rates: '{bad}' needs a learning rate > 0"):
            run.parse_learning_rates(bad)
    assert run.parse_learning_rates("lora=1e-3")["lora"]["learning_rate"] == 1e-3
