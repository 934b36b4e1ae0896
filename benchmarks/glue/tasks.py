"""GLUE tasks read from the standard ``glue_data`` TSV files, and their GLUE metrics (numpy only).

Each task yields examples ``{"text_a": str, "text_b": str | None, "label": int | float}``; STS-B is a regression
task (``num_labels == 1``, float labels in [0, 5]).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``predictions`` (shape ``(n,)``) equal to ``labels`` (shape ``(n,)``)."""
    return float((predictions == labels).mean())


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1), 0.0 when there are no true or predicted positives."""
    true_positive = float(((predictions == 1) & (labels == 1)).sum())
    denominator = float((predictions == 1).sum() + (labels == 1).sum())
    return 2.0 * true_positive / denominator if denominator else 0.0


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient of binary predictions; 0.0 when a marginal is constant (as sklearn does)."""
    tp = float(((predictions == 1) & (labels == 1)).sum())
    tn = float(((predictions == 0) & (labels == 0)).sum())
    fp = float(((predictions == 1) & (labels == 0)).sum())
    fn = float(((predictions == 0) & (labels == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two float vectors of shape ``(n,)``; 0.0 when either is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator else 0.0


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (shape ``(n,)``), ties sharing their average rank (scipy's ``rankdata``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start index of each run of equal values, and each element's run
    run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_ends = np.r_[run_starts[1:], len(values)]
    run_of_sorted = np.repeat(np.arange(len(run_starts)), run_ends - run_starts)
    average_rank = (run_starts + run_ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average_rank[run_of_sorted]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: how to read its TSV files and how it is scored.

    ``metric`` maps (predictions, labels) to a dict of GLUE scores; ``main_metric`` is the score tables report
    (MRPC: the mean of accuracy and F1, STS-B: the mean of Pearson and Spearman, as the GLUE leaderboard averages).
    """

    name: str
    num_labels: int
    has_header: bool
    text_a: int | str
    text_b: int | str | None
    label: int | str
    label_map: dict[str, int] | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """GLUE scores of ``predictions`` (class ids, or floats for STS-B) against ``labels``; includes ``main``."""
        if self.name == "CoLA":
            out = {"matthews": matthews_correlation(predictions, labels)}
            out["main"] = out["matthews"]
        elif self.name == "MRPC":
            out = {"accuracy": accuracy(predictions, labels), "f1": binary_f1(predictions, labels)}
            out["main"] = (out["accuracy"] + out["f1"]) / 2
        elif self.name == "STS-B":
            out = {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
            out["main"] = (out["pearson"] + out["spearman"]) / 2
        else:
            out = {"accuracy": accuracy(predictions, labels)}
            out["main"] = out["accuracy"]
        return out


TASKS: dict[str, GlueTask] = {
    "CoLA": GlueTask("CoLA", 2, has_header=False, text_a=3, text_b=None, label=1),
    "MRPC": GlueTask("MRPC", 2, has_header=True, text_a="#1 String", text_b="#2 String", label="Quality"),
    "RTE": GlueTask(
        "RTE", 2, True, "sentence1", "sentence2", "label", label_map={"entailment": 0, "not_entailment": 1}
    ),
    "SST-2": GlueTask("SST-2", 2, has_header=True, text_a="sentence", text_b=None, label="label"),
    "STS-B": GlueTask("STS-B", 1, has_header=True, text_a="sentence1", text_b="sentence2", label="score"),
}


def check_labels(examples: list[dict], task: GlueTask, source: str) -> list[dict]:
    """``examples`` unchanged if every class label is one of the task's; regression labels are not checked.

    Raises:
        ValueError: naming ``source`` and the labels outside ``0..num_labels - 1``.
    """
    if not task.is_regression:
        bad = {example["label"] for example in examples} - set(range(task.num_labels))
        if bad:
            raise ValueError(f"{source}: labels {sorted(bad)} outside 0..{task.num_labels - 1}")
    return examples


def read_split(data_dir: Path, task: GlueTask, split: str) -> list[dict]:
    """Examples of ``split`` ("train" or "dev") of ``task`` from ``data_dir/<task>/<split>.tsv``.

    Raises:
        FileNotFoundError: the TSV file is missing (the message names the path).
        ValueError: a row lacks a column or has a label outside the task's labels (names the file and line).
    """
    path = Path(data_dir) / task.name / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path} (expected the standard glue_data layout)")
    convert: Callable[[str], int | float] = float if task.is_regression else int
    examples = []
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE: GLUE sentences contain unbalanced quotes
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader) if task.has_header else None
        columns = {name: index for index, name in enumerate(header)} if header else {}

        def column(row: list[str], key: int | str) -> str:
            return row[columns[key] if isinstance(key, str) else key]

        for line_number, row in enumerate(reader, start=2 if header else 1):
            try:
                raw_label = column(row, task.label)
                label = task.label_map[raw_label] if task.label_map else convert(raw_label)
                text_b = column(row, task.text_b) if task.text_b is not None else None
                examples.append({"text_a": column(row, task.text_a), "text_b": text_b, "label": label})
            except (IndexError, KeyError, ValueError) as error:
                raise ValueError(f"{path}:{line_number}: malformed row for task {task.name}: {error!r}") from error
    return check_labels(examples, task, str(path))


# GLUE on the Hugging Face Hub: dataset id, the config name of each task, and its columns (test labels are hidden)
HUB_DATASET = "nyu-mll/glue"
HUB_CONFIGS = {"CoLA": "cola", "MRPC": "mrpc", "RTE": "rte", "SST-2": "sst2", "STS-B": "stsb"}
HUB_SPLITS = {"train": "train", "dev": "validation"}


def examples_from_hub_rows(rows, task: GlueTask) -> list[dict]:
    """Examples in the reader's form from rows of the Hub dataset (``sentence`` or ``sentence1``/``sentence2`` and
    ``label``; the Hub's RTE and MRPC labels already use this module's ids).

    Raises:
        ValueError: a row lacks a column or has a label outside the task's labels.
    """
    first, second = ("sentence", None) if task.text_b is None else ("sentence1", "sentence2")
    examples = []
    for index, row in enumerate(rows):
        try:
            label = float(row["label"]) if task.is_regression else int(row["label"])
            examples.append({"text_a": row[first], "text_b": row[second] if second else None, "label": label})
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{HUB_DATASET}/{HUB_CONFIGS[task.name]} row {index}: malformed: {error!r}") from error
    return check_labels(examples, task, f"{HUB_DATASET}/{HUB_CONFIGS[task.name]}")


def load_split(task: GlueTask, split: str, data_dir: Path | None = None) -> list[dict]:
    """Examples of ``split`` ("train" or "dev") of ``task``: from ``data_dir/<task>/<split>.tsv`` when ``data_dir`` is
    given (the standard ``glue_data`` layout), else through ``datasets`` from the Hub (``nyu-mll/glue``).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_split`, or when the Hub cannot be reached (the message names
            the dataset id and ``--data``).
    """
    if data_dir is not None:
        return read_split(data_dir, task, split)
    import datasets

    try:
        rows = datasets.load_dataset(HUB_DATASET, HUB_CONFIGS[task.name], split=HUB_SPLITS[split])
    except Exception as error:  # offline, or the Hub refused: say what was tried and the way out
        raise FileNotFoundError(
            f"could not load GLUE {task.name} ({HUB_DATASET}, config {HUB_CONFIGS[task.name]!r}, split "
            f"{HUB_SPLITS[split]!r}) from the Hub: {type(error).__name__}: {error}. Offline, pass --data DIR with "
            "the standard glue_data folders (<DIR>/<TASK>/train.tsv, dev.tsv)."
        ) from error
    return examples_from_hub_rows(rows, task)
