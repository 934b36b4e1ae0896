"""``roselora-edit``: edit facts from an EasyEdit / MEND / CounterFact JSON file into a local causal LM.

    roselora-edit --model PATH --data FILE [--method roselora|lora|adalora|ft-l|all] [--mode single|batch|sequential]
                  [--limit N] [--seed S] [--output results.json] [--plot metrics.png]
                  [--lr LR] [--steps N] [--r R] [--alpha A] [--targets q_proj v_proj] [--keep-ratio TAU]
                  [--clamp C | --no-clamp]

Every per-record result is appended to ``<output stem>.jsonl`` as soon as it is produced (one JSON line each: a
crash at record N keeps records 1..N-1); at the end ``--output`` gets the summary per method (means of reliability,
generalisation, locality, portability, steps, fraction of adapted weights changed, seconds per edit) and the records.
Malformed records are listed in the output (``rejected``), never dropped silently. A record whose loss is not
finite is marked failed with the reason and the run exits with status 1; output stays strict JSON (no NaN). User
errors (missing or unreadable files, bad JSON, non-UTF-8, a byte-order mark, bad options) print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import SPLITS, EditDataError, load_edit_requests, select_split
from .editor import METHODS, EditHyperParams, Editor


SUMMARY_FIELDS = (
    "reliability",
    "generalization",
    "locality",
    "portability",
    "steps",
    "changed_fraction_of_adapted",
    "seconds",
)


def summarize(rows: list[dict]) -> dict:
    """Mean of every summary field over the rows that have it."""
    summary = {}
    for name in SUMMARY_FIELDS:
        values = [row[name] for row in rows if row.get(name) is not None]
        summary[name] = statistics.fmean(values) if values else None
    summary["edits"] = len(rows)
    return summary


def _number_option(name: str, convert, expected: str, valid):
    """An argparse ``type`` converting with ``convert`` and accepting values for which ``valid`` holds; errors name
    the option, what it expects and the text given."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}")
        return value

    return parse


def _finite_positive(name: str):
    return _number_option(name, float, "a finite number > 0", lambda value: math.isfinite(value) and value > 0)


def _positive_int(name: str):
    return _number_option(name, int, "an integer >= 1", lambda value: value >= 1)


def _keep_ratio(text: str) -> float:
    value = _finite_positive("--keep-ratio")(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"--keep-ratio must be in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roselora-edit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="local Hugging Face causal LM folder (model and tokenizer)")
    parser.add_argument("--data", required=True, help="JSON file of edit records (EasyEdit, MEND zsRE, CounterFact)")
    parser.add_argument("--method", default="roselora", choices=[*METHODS, "all"])
    parser.add_argument("--mode", default="single", choices=["single", "batch", "sequential"])
    parser.add_argument("--limit", type=_positive_int("--limit"), default=None, help="first N records only")
    parser.add_argument(
        "--split",
        default="all",
        choices=list(SPLITS),
        help="edit only one side of the deterministic dev (tuning) / test (reporting) split, decided per record by a "
        "hash of its prompt and target (see peft_roselora.editing.split_of); default all",
    )
    parser.add_argument(
        "--dev-fraction",
        type=_number_option("--dev-fraction", float, "a number in (0, 1)", lambda value: 0 < value < 1),
        default=0.5,
        help="share of records on the dev side of --split (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=_finite_positive("--lr"), default=None, help="learning rate (default 5e-4)")
    parser.add_argument(
        "--steps",
        type=_positive_int("--steps"),
        default=None,
        help="optimizer steps per edit (default 25; the schedule is scaled in proportion)",
    )
    parser.add_argument("--r", type=_positive_int("--r"), default=None, help="adapter rank (default 8)")
    parser.add_argument("--alpha", type=_finite_positive("--alpha"), default=None, help="lora_alpha (default 32)")
    parser.add_argument("--targets", nargs="+", default=None, help="target modules (default q_proj v_proj)")
    parser.add_argument("--keep-ratio", type=_keep_ratio, default=None, help="RoseLoRA keep ratio (default 0.05)")
    clamp = parser.add_mutually_exclusive_group()
    clamp.add_argument("--clamp", type=_finite_positive("--clamp"), default=None, help="RoseLoRA clamp (default 3e-3)")
    clamp.add_argument("--no-clamp", action="store_true", help="turn RoseLoRA's clamp off")
    parser.add_argument("--output", default="edit_results.json")
    parser.add_argument("--plot", default=None, help="PNG with the summary metrics per method (needs matplotlib)")
    return parser


def hyper_parameters(args: argparse.Namespace, method: str) -> EditHyperParams:
    """The editing hyperparameters the options select (the recipe's defaults for the options not given)."""
    overrides = {}
    for option, name in (("lr", "lr"), ("r", "r"), ("alpha", "lora_alpha"), ("keep_ratio", "keep_ratio")):
        if getattr(args, option) is not None:
            overrides[name] = getattr(args, option)
    if args.targets is not None:
        overrides["target_modules"] = tuple(args.targets)
    if args.no_clamp:
        overrides["clamp_value"] = None
    elif args.clamp is not None:
        overrides["clamp_value"] = args.clamp
    if args.steps is not None:
        return EditHyperParams.scaled_to(args.steps, method=method, **overrides)
    return EditHyperParams(method=method, **overrides)


def _checked_row(result) -> dict:
    """The result as a strict-JSON dict: a non-finite loss marks the record failed with the reason."""
    row = result.to_dict()
    bad = [name for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
    for name in bad:
        row[name] = None
    if bad:
        row["failed"] = f"non-finite {', '.join(bad)}"
    return row


def _user_error(message: str) -> int:
    print(f"roselora-edit: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _user_error("--plot needs matplotlib (pip install matplotlib)")
    output = Path(args.output)
    stream = output.with_suffix(".jsonl")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        stream.write_text("")
        loaded = load_edit_requests(args.data, limit=args.limit, on_invalid="collect")
        loaded.requests = select_split(loaded.requests, args.split, args.dev_fraction)
    except (OSError, EditDataError) as error:
        return _user_error(str(error) if isinstance(error, EditDataError) else f"{error.strerror}: {error.filename}")
    if not os.path.isdir(args.model):
        return _user_error(f"--model {args.model}: no such folder")
    try:
        methods = list(METHODS) if args.method == "all" else [args.method]
        hparams = {method: hyper_parameters(args, method) for method in methods}
    except ValueError as error:
        return _user_error(str(error))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for _, _, message in loaded.rejected:
        print(f"roselora-edit: rejected {message}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = {
        "model": args.model,
        "data": args.data,
        "mode": args.mode,
        "split": args.split,
        "dev_fraction": args.dev_fraction,
        "records": len(loaded.requests),
        "seed": args.seed,
        "rejected": [{"record": i, "field": f, "error": m} for i, f, m in loaded.rejected],
        "methods": {},
    }
    failed = 0
    with stream.open("a", encoding="utf-8") as lines:
        for method in methods:
            torch.manual_seed(args.seed)
            editor = Editor(AutoModelForCausalLM.from_pretrained(args.model), tokenizer, hparams[method])
            if args.mode == "single":
                results = (editor.edit_single(r) for r in tqdm(loaded.requests, desc=f"{method} edits"))
            elif args.mode == "batch":
                results = iter([editor.edit_batch(loaded.requests)])
            else:
                results = iter(editor.edit_sequential(loaded.requests))
            rows = []
            for result in results:
                row = _checked_row(result)
                failed += "failed" in row
                rows.append(row)
                lines.write(json.dumps({"method": method, **row}, allow_nan=False) + "\n")
                lines.flush()
            summary = summarize([row for row in rows if "failed" not in row])
            summary["failed"] = sum("failed" in row for row in rows)
            report["methods"][method] = {"summary": summary, "records": rows}
            print(f"{method}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float)))
    with output.open("w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
    if args.plot:
        plot_summary(report, args.plot)
    if failed:
        print(f"roselora-edit: {failed} record(s) failed (non-finite loss); see 'failed' in {output}", file=sys.stderr)
        return 1
    return 0


def plot_summary(output: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["reliability", "generalization", "locality"]
    methods = list(output["methods"])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [output["methods"][method]["summary"][n] or 0.0 for n in names]
        axis.bar([j + i * width for j in range(len(names))], values, width=width, label=method)
    axis.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(names))], names)
    axis.set_ylim(0, 1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
