"""``roselora-edit``: edit facts from an EasyEdit / MEND / CounterFact JSON file into a local causal LM.

    roselora-edit --model PATH --data FILE [--method roselora|lora|adalora|ft-l|all] [--mode single|batch|sequential]
                  [--limit N] [--seed S] [--output results.json] [--plot metrics.png]

Writes per-record results and a summary per method (means of reliability, generalisation, locality, portability,
steps, fraction of adapted weights changed, seconds per edit) to ``--output``. Malformed records are listed in the
output (``rejected``), never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import load_edit_requests
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roselora-edit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="local Hugging Face causal LM folder (model and tokenizer)")
    parser.add_argument("--data", required=True, help="JSON file of edit records (EasyEdit, MEND zsRE, CounterFact)")
    parser.add_argument("--method", default="roselora", choices=[*METHODS, "all"])
    parser.add_argument("--mode", default="single", choices=["single", "batch", "sequential"])
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's 5e-4)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per edit (default 25; the schedule is scaled in proportion)",
    )
    parser.add_argument("--output", default="edit_results.json")
    parser.add_argument("--plot", default=None, help="PNG with the summary metrics per method (needs matplotlib)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"roselora-edit: --limit must be >= 1, got {args.limit}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("roselora-edit: --plot needs matplotlib (pip install matplotlib)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_edit_requests(args.data, limit=args.limit, on_invalid="collect")
    for _, _, message in loaded.rejected:
        print(f"roselora-edit: rejected {message}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    methods = list(METHODS) if args.method == "all" else [args.method]
    output = {
        "model": args.model,
        "data": args.data,
        "mode": args.mode,
        "seed": args.seed,
        "rejected": [{"record": i, "field": f, "error": m} for i, f, m in loaded.rejected],
        "methods": {},
    }
    for method in methods:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        overrides = {"lr": args.lr} if args.lr is not None else {}
        if args.steps is not None:
            hparams = EditHyperParams.scaled_to(args.steps, method=method, **overrides)
        else:
            hparams = EditHyperParams(method=method, **overrides)
        editor = Editor(model, tokenizer, hparams)
        if args.mode == "single":
            results = [editor.edit_single(r) for r in tqdm(loaded.requests, desc=f"{method} edits")]
        elif args.mode == "batch":
            results = [editor.edit_batch(loaded.requests)]
        else:
            results = editor.edit_sequential(loaded.requests)
        rows = [result.to_dict() for result in results]
        output["methods"][method] = {"summary": summarize(rows), "records": rows}
        print(
            f"{method}: "
            + ", ".join(
                f"{k} {v:.4f}" for k, v in output["methods"][method]["summary"].items() if isinstance(v, float)
            )
        )
    with open(args.output, "w") as handle:
        json.dump(output, handle, indent=2)
    if args.plot:
        plot_summary(output, args.plot)
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
