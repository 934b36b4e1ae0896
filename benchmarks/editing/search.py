"""The fair protocol: the same search budget per method on the dev records, the report on the test records.

    python benchmarks/editing/search.py --data ../shared/data/zsre/zsre_mend_eval_subset.json     # the full protocol
    python benchmarks/editing/search.py --quick --data tests/fixtures/zsre_sample.json            # CI's smoke run

1. Search (dev): every method gets the same number of configurations (``--budget``, default 12): its default
   configuration and ``budget - 1`` draws from its search space (``SPACES``, seeded), each run on the first
   ``--dev-records`` dev records, one edit at a time from the unedited model.
2. Choice: per method, the dev configuration with the highest reliability (then generalisation) among those whose
   dev locality is at least ``--locality-floor`` (default 0.9); none qualifying: the highest locality.
3. Report (test): the chosen configuration on every test record, and each method's dev Pareto front
   (reliability vs locality) on the first ``--frontier-records`` test records: the frontier plot (``--plot``).

Every configuration's result is appended to ``<output stem>.jsonl`` as it finishes, the test report in chunks of
``--test-chunk`` records (each chunk edited from the unedited model with the same seed, like a run of its own); a
rerun with the same output resumes, skipping the configurations and chunks already there, so a larger
``--test-records`` extends an earlier report instead of redoing it. ``--output`` gets the chosen configurations (read
by ``batch.py`` and ``sequential.py``), their test results and the frontier.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from run import HERE, add_model_arguments, glue_sample_description, prepare, text_sample, use_quick_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from peft_roselora.editing import METHODS, EditHyperParams, Editor
from peft_roselora.editing.locate import default_edit_layers


ATTENTION, ATTENTION_MLP = ("q_proj", "v_proj"), ("q_proj", "v_proj", "up_proj", "down_proj")

# The default configuration of each method (the adapted setting of docs/editing.md for the gradient methods, the
# papers' defaults for MEMIT / AlphaEdit), then the knobs the search draws; a tuple is a choice, a (low, high, "log")
# a log-uniform draw.
DEFAULTS = {
    "roselora": dict(lr=1e-2, clamp_value=None),
    "lora": dict(lr=1e-2),
    "adalora": dict(lr=1e-2),
    "ft-l": dict(lr=1e-2, ft_norm=5e-2),
    "memit": dict(),
    "alphaedit": dict(),
}
GRADIENT_SPACE = {
    "lr": (1e-3, 5e-2, "log"),
    "steps": (25, 50),
    "target_modules": (ATTENTION, ATTENTION_MLP),
    "r": (4, 8, 16),
}
SPACES = {
    "roselora": {**GRADIENT_SPACE, "keep_ratio": (0.03, 0.05, 0.1, 0.2), "schedule_end": (0.5, 0.8)},
    "lora": GRADIENT_SPACE,
    "adalora": {**GRADIENT_SPACE, "adalora_target_fraction": (0.25, 0.5, 0.75)},
    "ft-l": {"lr": (1e-3, 5e-2, "log"), "steps": (25, 50), "ft_layer": (0, 1, 2), "ft_norm": (5e-3, 2e-1, "log")},
    "memit": {
        "edit_layers": ((0,), (1,), (0, 1)),
        "fact_token": ("subject_last", "last"),
        "v_lr": (0.1, 0.5, 1.0),
        "v_steps": (25, 50),
        "mom2_weight": (1.0, 1e5, "log"),
    },
    "alphaedit": {
        "edit_layers": ((0,), (1,), (0, 1)),
        "fact_token": ("subject_last", "last"),
        "v_lr": (0.1, 0.5, 1.0),
        "v_steps": (25, 50),
        "nullspace_threshold": (1e-3, 1.0, "log"),
        "l2": (1e-2, 10.0, "log"),
    },
}


def space_for(method: str, num_layers: int) -> dict:
    """``SPACES[method]``, whose layer choices are written for the 3-layer benchmark model, for a model of
    ``num_layers`` decoder layers: with more than 3, MEMIT / AlphaEdit choose between the papers' block at 15-30 % of
    the depth (``default_edit_layers``), that block two layers earlier, and its middle layer alone; FT-L between the
    layers at 15, 30 and 50 % of the depth; the adapters may also target ``down_proj`` alone, on every layer or on
    the papers' block (``adapter_layers``)."""
    space = dict(SPACES[method])
    if num_layers <= 3:
        return space
    block = default_edit_layers(num_layers)
    if "edit_layers" in space:
        earlier = tuple(range(max(0, block[0] - 2), max(1, block[-1] - 1)))
        space["edit_layers"] = (block, earlier, (block[len(block) // 2],))
    if "ft_layer" in space:
        space["ft_layer"] = tuple(sorted({round(f * (num_layers - 1)) for f in (0.15, 0.3, 0.5)}))
    if "target_modules" in space:
        space["target_modules"] = (*space["target_modules"], ("down_proj",))
        space["adapter_layers"] = (None, block)
    return space


def draw(space: dict, generator: random.Random) -> dict:
    """One configuration from ``space`` (see ``SPACES``)."""
    config = {}
    for name, values in space.items():
        if len(values) == 3 and isinstance(values[2], str) and values[2] == "log":
            low, high = math.log(values[0]), math.log(values[1])
            config[name] = float(f"{math.exp(generator.uniform(low, high)):.3g}")
        else:
            config[name] = values[generator.randrange(len(values))]
    return config


def configurations(method: str, budget: int, seed: int, num_layers: int) -> list[dict]:
    """The method's default configuration and ``budget - 1`` draws (layer indices kept below ``num_layers``)."""
    generator = random.Random(f"{method}-{seed}")
    # DEFAULTS were chosen for the 3-layer benchmark model; a deeper (pretrained) model starts from the package's
    # defaults (EditHyperParams(), chosen on SmolLM2-135M's dev records; the papers' for MEMIT / AlphaEdit)
    found = [dict(DEFAULTS[method]) if num_layers <= 3 else {}]
    while len(found) < budget:
        config = {**found[0], **draw(space_for(method, num_layers), generator)}
        if config.get("adapter_layers", 0) is None:
            del config["adapter_layers"]
        if all(layer < num_layers - (0 if method == "ft-l" else 1) for layer in _layers(config)):
            found.append(config)
    return found


def _layers(config: dict) -> tuple[int, ...]:
    return tuple(config.get("edit_layers", ())) + ((config["ft_layer"],) if "ft_layer" in config else ())


def chosen_configs(paths: list[str], methods: list[str], script: str) -> dict:
    """The configuration each of ``methods`` chose in search.py outputs ``paths`` (merged by method).

    Raises:
        ValueError: a file is missing or malformed, or a method has no chosen configuration (names the script,
            the files and the methods).
    """
    try:
        chosen = {
            method: data["chosen_config"]
            for path in paths
            for method, data in json.loads(Path(path).read_text()).get("methods", {}).items()
        }
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{script}: --configs {paths}: {error} (run search.py first)") from None
    missing = [m for m in methods if m not in chosen]
    if missing:
        raise ValueError(f"{script}: --configs {paths} has no chosen configuration for {missing}")
    return chosen


def key_of(phase: str, method: str, config: dict, start: int, records: int) -> tuple:
    """The resume key of a measurement: which records (``start``, ``records``) of a phase, with which configuration."""
    return phase, method, json.dumps(config, sort_keys=True), start, records


def hyper_parameters(method: str, config: dict) -> EditHyperParams:
    """The :class:`EditHyperParams` of a configuration (see ``EditHyperParams.from_config``)."""
    return EditHyperParams.from_config(method, config)


METRICS = ("reliability", "generalization", "locality")


def evaluate(method, config, requests, setup, texts, seed) -> dict:
    """Single edits of ``requests`` with one configuration (``texts``: the text sample): mean metrics and changed
    fraction."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(setup.model_path)
    editor = Editor(model, setup.tokenizer, hyper_parameters(method, config), stats_texts=texts)
    start = time.perf_counter()
    rows = [editor.edit_single(r) for r in requests]
    total_weights = sum(p.numel() for p in model.parameters())

    def values(name):
        return [getattr(r, name) for r in rows if getattr(r, name) is not None]

    return {
        "method": method,
        "config": config,
        "records": len(rows),
        **{name: statistics.fmean(values(name)) if values(name) else None for name in METRICS},
        "counts": {name: len(values(name)) for name in METRICS},
        "steps": statistics.fmean(values("steps")) if values("steps") else None,
        "changed_fraction_of_adapted": statistics.fmean(r.changed_fraction_of_adapted for r in rows),
        "changed_fraction_of_all": statistics.fmean(r.changed_weights / total_weights for r in rows),
        "seconds_per_edit": (time.perf_counter() - start) / len(rows),
    }


def weighted_mean(pairs) -> float | None:
    """The mean of ``(value, count)`` pairs weighted by their counts, pairs with value None or count 0 left out; None
    when none is left."""
    kept = [(value, count) for value, count in pairs if value is not None and count]
    return sum(value * count for value, count in kept) / sum(count for _, count in kept) if kept else None


def merge_chunks(rows: list[dict]) -> dict:
    """One result from the results of consecutive chunks of records (``evaluate`` rows): every mean weighted by the
    records it covers (``counts[metric]`` records for a metric some records lack, else ``records``).

    Raises:
        ValueError: ``rows`` is empty or its chunks are not consecutive from the first (names the starts).
    """
    if not rows:
        raise ValueError("merge_chunks: no rows")
    starts = [row.get("start", 0) for row in rows]
    expected = [0] + [sum(row["records"] for row in rows[:i]) for i in range(1, len(rows))]
    if starts != expected:
        raise ValueError(f"merge_chunks: chunk starts {starts} are not consecutive (expected {expected})")
    records = sum(row["records"] for row in rows)
    merged = {key: value for key, value in rows[0].items() if key not in ("start", "counts")}
    merged["chunks"] = len(rows)
    if len(rows) == 1:
        return merged

    merged["records"] = records
    for name in METRICS:
        merged[name] = weighted_mean((row[name], row.get("counts", {}).get(name, row["records"])) for row in rows)
    for name in ("steps", "changed_fraction_of_adapted", "changed_fraction_of_all", "seconds_per_edit"):
        merged[name] = weighted_mean((row[name], row["records"]) for row in rows)
    return merged


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both reliability and locality."""
    return [
        p
        for p in points
        if not any(
            q["reliability"] >= p["reliability"]
            and q["locality"] >= p["locality"]
            and (q["reliability"] > p["reliability"] or q["locality"] > p["locality"])
            for q in points
        )
    ]


def choose(points: list[dict], floor: float) -> dict:
    """Highest reliability (then generalisation) with locality >= ``floor``; else the highest locality."""
    qualified = [p for p in points if p["locality"] >= floor]
    if qualified:
        return max(qualified, key=lambda p: (p["reliability"], p["generalization"] or 0.0))
    return max(points, key=lambda p: p["locality"])


def plot_frontier(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for index, (method, data) in enumerate(report["methods"].items()):
        color = f"C{index}"
        dev = data["dev"]
        axis.scatter([p["locality"] for p in dev], [p["reliability"] for p in dev], color=color, alpha=0.25, s=14)
        front = sorted(data["frontier_test"], key=lambda p: p["locality"])
        axis.plot(
            [p["locality"] for p in front], [p["reliability"] for p in front], "-o", color=color, label=method, ms=4
        )
        chosen = data["chosen_test"]
        axis.scatter([chosen["locality"]], [chosen["reliability"]], color=color, marker="*", s=160, edgecolor="k")
    axis.axvline(report["locality_floor"], color="grey", lw=0.8, ls="--")
    axis.set_xlabel("locality")
    axis.set_ylabel("reliability")
    axis.set_title("zsRE, single edits: test frontier (lines), dev search (dots), chosen (stars)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budget", type=int, default=12, help="configurations per method (default 12)")
    parser.add_argument("--dev-records", type=int, default=40, help="dev records per configuration (default 40)")
    parser.add_argument("--frontier-records", type=int, default=60, help="test records per frontier point")
    parser.add_argument("--test-records", type=int, default=None, help="only the first N test records (default all)")
    parser.add_argument("--test-chunk", type=int, default=32, help="test records per resumable chunk (default 32)")
    parser.add_argument("--locality-floor", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="12 records, a small base model, budget 2 (CI)")
    parser.add_argument("--output", default=str(HERE.parent / "results" / "editing_search.json"))
    parser.add_argument("--plot", default=None, help="PNG of the reliability-locality frontier (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        use_quick_model(args)
        args.budget, args.dev_records, args.frontier_records = 2, 4, 4
    counts = {name: getattr(args, name) for name in ("budget", "dev_records", "frontier_records", "test_chunk")}
    bad = {f"--{name.replace('_', '-')}": value for name, value in counts.items() if value < 1}
    if bad:
        print(f"search.py: {bad} must each be >= 1", file=sys.stderr)
        return 2
    try:
        setup = prepare(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"search.py: {error}", file=sys.stderr)
        return 2
    if not setup.dev or not setup.test:
        print(f"search.py: the split left {len(setup.dev)} dev / {len(setup.test)} test records", file=sys.stderr)
        return 2
    num_layers = AutoModelForCausalLM.from_pretrained(setup.model_path).config.num_hidden_layers
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stream = output.with_suffix(".jsonl")
    done = {}
    if stream.exists():  # resume: the configurations already measured
        for line in stream.read_text().splitlines():
            row = json.loads(line)
            done[key_of(row["phase"], row["method"], row["config"], row.get("start", 0), row["records"])] = row
    dev, test = setup.dev[: args.dev_records], setup.test[: args.test_records]
    # the text sample never holds an edited record's text: the dev search reads the dev records it does not edit
    dev_texts = text_sample(setup, setup.dev[args.dev_records :])

    def measured(phase, method, config, requests, start=0):
        key = key_of(phase, method, config, start, len(requests))
        if key not in done:
            texts = dev_texts if phase == "dev" else setup.texts
            row = {"phase": phase, "start": start, **evaluate(method, config, requests, setup, texts, args.seed)}
            with stream.open("a") as lines:
                lines.write(json.dumps(row) + "\n")
            done[key] = row
        return done[key]

    report = {
        "data": args.data,
        "model": str(setup.model_path),
        "dev_records": len(dev),
        "test_records": len(test),
        "frontier_records": min(args.frontier_records, len(test)),
        "budget": args.budget,
        "locality_floor": args.locality_floor,
        "text_sample": glue_sample_description(setup)
        or f"test: {len(setup.texts)} training texts of the {len(setup.dev)} dev records; dev search: "
        f"{len(dev_texts)} of the dev records not searched on",
        "methods": {},
    }
    for method in args.methods:
        configs = configurations(method, args.budget, args.seed, num_layers)
        dev_points = [measured("dev", method, c, dev) for c in tqdm(configs, desc=f"{method} search")]
        chosen = choose(dev_points, args.locality_floor)
        front = pareto(dev_points)
        frontier_test = [measured("frontier", method, p["config"], test[: args.frontier_records]) for p in front]
        chunks = range(0, len(test), args.test_chunk)
        chosen_test = merge_chunks(
            [measured("test", method, chosen["config"], test[i : i + args.test_chunk], i) for i in chunks]
        )
        report["methods"][method] = {
            "chosen_config": chosen["config"],
            "chosen_dev": chosen,
            "chosen_test": chosen_test,
            "dev": dev_points,
            "frontier_test": frontier_test,
        }
        print(
            f"{method}: chosen {chosen['config']}: test reliability {chosen_test['reliability']:.3f}, generalisation "
            f"{chosen_test['generalization']:.3f}, locality {chosen_test['locality']:.3f}, changed "
            f"{chosen_test['changed_fraction_of_all']:.5f} of all base weights",
            flush=True,
        )
    output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_frontier(report, args.plot)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
