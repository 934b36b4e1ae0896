"""``roselora-edit``: edit facts from an EasyEdit / MEND / CounterFact JSON file into a local causal LM.

    roselora-edit --model PATH --data FILE [--method roselora|lora|adalora|ft-l|memit|alphaedit|all]
                  [--mode single|batch|sequential] [--checkpoints N ...] [--resume] [--stats-text FILE]
                  [--config FILE] [--limit N] [--split all|dev|test] [--seed S] [--output results.json]
                  [--plot metrics.png] [hyperparameter options, see --help]

Every per-record result is appended to ``<output stem>.jsonl`` as soon as it is produced (one JSON line each: a
crash at record N keeps records 1..N-1); at the end ``--output`` gets the summary per method (means of reliability,
generalisation, locality, portability, steps, fraction of adapted weights changed, seconds per edit) and the records.
``--mode sequential`` edits the records one after another into one model and measures every edit so far at each
``--checkpoints`` N (and after the last): those lines go to the same stream, and the editor's state is saved at each
checkpoint to ``<output stem>.<method>.state.safetensors``; with ``--shared-adapter`` the edits end as one PEFT adapter
folder, ``<output stem>.<method>.adapter``. ``--resume`` continues a run with the same output: single
mode skips the records already in the stream, sequential mode restarts from the saved state (ending exactly where an
uninterrupted run would).
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
from dataclasses import asdict
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
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        type=_positive_int("--checkpoints"),
        default=[],
        help="sequential mode: measure every edit so far after these numbers of edits (and after the last)",
    )
    parser.add_argument("--resume", action="store_true", help="continue a run with the same --output")
    parser.add_argument(
        "--stats-text",
        default=None,
        help="text sample like the model's training text (UTF-8, one text per line): MEMIT / AlphaEdit's key "
        "statistics and the many-edit mode's preservation loss; required for those",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="JSON file of hyperparameters: a dict of EditHyperParams fields, a dict of them per method, or the "
        "output of benchmarks/editing/search.py (its chosen configurations); options given explicitly win",
    )
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
    parser.add_argument("--ft-layer", type=int, default=None, help="FT-L: decoder layer (default the middle one)")
    parser.add_argument("--ft-norm", type=_finite_positive("--ft-norm"), default=None, help="FT-L: L-inf bound")
    parser.add_argument("--edit-layers", nargs="+", type=int, default=None, help="MEMIT / AlphaEdit layers")
    parser.add_argument("--fact-token", choices=["subject_last", "last"], default=None, help="MEMIT / AlphaEdit")
    parser.add_argument("--v-lr", type=_finite_positive("--v-lr"), default=None, help="MEMIT / AlphaEdit (0.5)")
    parser.add_argument("--v-steps", type=_positive_int("--v-steps"), default=None, help="MEMIT / AlphaEdit (25)")
    parser.add_argument("--mom2-weight", type=_finite_positive("--mom2-weight"), default=None, help="MEMIT (15000)")
    parser.add_argument(
        "--nullspace-threshold", type=_finite_positive("--nullspace-threshold"), default=None, help="AlphaEdit (2e-2)"
    )
    parser.add_argument("--l2", type=_finite_positive("--l2"), default=None, help="AlphaEdit (10)")
    parser.add_argument(
        "--replay",
        type=_number_option("--replay", int, "an integer >= 0", lambda value: value >= 0),
        default=None,
        help="many-edit mode: earlier edits replayed in every step of a sequential edit (default 0)",
    )
    parser.add_argument(
        "--replay-priority",
        type=_number_option(
            "--replay-priority", float, "a number in [0, 1]", lambda v: math.isfinite(v) and 0 <= v <= 1
        ),
        default=None,
        help="many-edit mode, with --replay: fraction of each step's replayed edits drawn in proportion to their "
        "target loss as the edit starts (forgotten edits first; default 0, uniform)",
    )
    parser.add_argument(
        "--preserve-weight",
        type=_number_option("--preserve-weight", float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
        default=None,
        help="many-edit mode: weight of the cross-entropy to the unedited model's predictions on --stats-text "
        "(default 0)",
    )
    parser.add_argument(
        "--preserve-batch",
        type=_positive_int("--preserve-batch"),
        default=None,
        help="many-edit mode: texts of --stats-text in each step's preservation loss (default 8)",
    )
    parser.add_argument(
        "--shared-adapter",
        action="store_true",
        default=None,
        help="sequential mode, roselora / lora: every edit trains one adapter kept across the sequence (RoseLoRA: "
        "one support, fixed after the first edit) instead of a fresh adapter merged after each edit",
    )
    parser.add_argument(
        "--shared-optimizer",
        action="store_true",
        default=None,
        help="with --shared-adapter: one Adam optimizer for the whole sequence instead of a fresh one per edit",
    )
    parser.add_argument(
        "--hold-steps",
        type=_number_option("--hold-steps", int, "an integer >= 0", lambda value: value >= 0),
        default=None,
        help="roselora / lora / adalora: up to this many more steps after --steps, until the edit holds (every "
        "target token predicted; default 0)",
    )
    parser.add_argument("--output", default="edit_results.json")
    parser.add_argument("--plot", default=None, help="PNG with the summary metrics per method (needs matplotlib)")
    return parser


OPTION_FIELDS = (
    ("lr", "lr"),
    ("r", "r"),
    ("alpha", "lora_alpha"),
    ("keep_ratio", "keep_ratio"),
    ("steps", "steps"),
    ("ft_layer", "ft_layer"),
    ("ft_norm", "ft_norm"),
    ("fact_token", "fact_token"),
    ("v_lr", "v_lr"),
    ("v_steps", "v_steps"),
    ("mom2_weight", "mom2_weight"),
    ("nullspace_threshold", "nullspace_threshold"),
    ("l2", "l2"),
    ("replay", "replay"),
    ("replay_priority", "replay_priority"),
    ("preserve_weight", "preserve_weight"),
    ("preserve_batch", "preserve_batch"),
    ("shared_adapter", "shared_adapter"),
    ("shared_optimizer", "shared_optimizer"),
    ("hold_steps", "hold_steps"),
)


def config_for(config: Optional[dict], method: str) -> dict:
    """The hyperparameter dict of ``method`` in a ``--config`` file's content (see the option's help)."""
    if not config:
        return {}
    if "methods" in config:  # benchmarks/editing/search.py output
        methods = config["methods"]
        return dict(methods[method]["chosen_config"]) if method in methods else {}
    if set(config) <= set(METHODS):
        return dict(config.get(method, {}))
    return dict(config)


def hyper_parameters(args: argparse.Namespace, method: str, config: Optional[dict] = None) -> EditHyperParams:
    """The editing hyperparameters the options select: the ``--config`` file's, then the options given explicitly,
    then the recipe's defaults (``steps`` scales the schedule in proportion, see ``EditHyperParams.from_config``)."""
    values = config_for(config, method)
    for option, name in OPTION_FIELDS:
        if getattr(args, option) is not None:
            values[name] = getattr(args, option)
    if args.targets is not None:
        values["target_modules"] = tuple(args.targets)
    if args.edit_layers is not None:
        values["edit_layers"] = tuple(args.edit_layers)
    if args.no_clamp:
        values["clamp_value"] = None
    elif args.clamp is not None:
        values["clamp_value"] = args.clamp
    return EditHyperParams.from_config(method, values)


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


def _read_stats_text(path: str) -> list[str]:
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise EditDataError(f"--stats-text {path}: the file holds no text")
    return texts


def _state_path(output: Path, method: str) -> Path:
    return output.with_name(f"{output.stem}.{method}.state.safetensors")


def _run_sequential(editor, requests, args, method, output, lines) -> tuple[list[dict], list[dict]]:
    """Sequential mode: edit rows (measured right after each edit) and checkpoint rows, streamed as they come."""
    from safetensors.torch import load_file, save_file

    state = _state_path(output, method)
    if args.resume and state.exists():
        done = editor.load_state_dict(load_file(state), requests)
        print(f"roselora-edit: {method}: resumed after {done} edits from {state}", file=sys.stderr)
    edits, checkpoints = [], []
    progress = tqdm(total=len(requests), initial=len(editor.memory), desc=f"{method} sequential edits")

    def on_edit(index, result):
        row = {**_checked_row(result), "kind": "edit", "index": index}
        edits.append(row)
        lines.write(json.dumps({"method": method, **row}, allow_nan=False) + "\n")
        lines.flush()
        progress.update(1)

    def on_checkpoint(checkpoint):
        row = {**checkpoint.to_dict(), "kind": "checkpoint"}
        checkpoints.append(row)
        lines.write(json.dumps({"method": method, **row}, allow_nan=False) + "\n")
        lines.flush()
        save_file(editor.state_dict(), str(state))

    marks = [c for c in args.checkpoints if c <= len(requests)]
    editor.edit_sequence(requests, checkpoints=marks, on_edit=on_edit, on_checkpoint=on_checkpoint, seed=args.seed)
    progress.close()
    return edits, checkpoints


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
        previous = stream.read_text(encoding="utf-8").splitlines() if args.resume and stream.exists() else []
        loaded = load_edit_requests(args.data, limit=args.limit, on_invalid="collect")
        loaded.requests = select_split(loaded.requests, args.split, args.dev_fraction)
        texts = _read_stats_text(args.stats_text) if args.stats_text else None
        config = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else None
    except (OSError, EditDataError) as error:
        return _user_error(str(error) if isinstance(error, EditDataError) else f"{error.strerror}: {error.filename}")
    except json.JSONDecodeError as error:
        return _user_error(f"--config {args.config}: invalid JSON: {error}")
    if not os.path.isdir(args.model):
        return _user_error(f"--model {args.model}: no such folder")
    try:
        methods = list(METHODS) if args.method == "all" else [args.method]
        hparams = {method: hyper_parameters(args, method, config) for method in methods}
    except ValueError as error:
        return _user_error(str(error))
    shared = [m for m, h in hparams.items() if h.shared_adapter]
    if shared and args.mode != "sequential":
        return _user_error(f"--shared-adapter ({shared}) needs --mode sequential, got --mode {args.mode}")
    replaying = [m for m, h in hparams.items() if h.replay > 0]
    if replaying and args.mode != "sequential":  # only a sequence has earlier edits to replay
        return _user_error(f"--replay ({replaying}) needs --mode sequential, got --mode {args.mode}")
    needs_text = [m for m, h in hparams.items() if m in ("memit", "alphaedit") or h.preserve_weight > 0]
    if needs_text and texts is None:
        return _user_error(f"{needs_text} need --stats-text FILE (a sample of text like the model's training text)")
    try:  # only once every option is valid: a refused run writes nothing, an earlier run's lines stay as they were
        output.parent.mkdir(parents=True, exist_ok=True)
        stream.write_text("".join(line + "\n" for line in previous), encoding="utf-8")
    except OSError as error:
        return _user_error(f"--output {args.output}: {error.strerror}: {error.filename}")
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
        "hparams": {},
        "methods": {},
    }
    earlier = {}  # --resume, single mode: the rows already streamed, by method and record
    for line in previous:
        row = json.loads(line)
        if row.get("kind") is None:
            earlier[(row["method"], json.dumps(row["record_ids"]))] = row
    failed = 0
    with stream.open("a", encoding="utf-8") as lines:
        for method in methods:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(args.model)
            editor = Editor(model, tokenizer, hparams[method], stats_texts=texts)
            report["hparams"][method] = asdict(hparams[method])
            if args.mode == "sequential":
                edits, checkpoints = _run_sequential(editor, loaded.requests, args, method, output, lines)
                failed += sum("failed" in row for row in edits)
                summary = checkpoints[-1] if checkpoints else {}
                report["methods"][method] = {"summary": summary, "checkpoints": checkpoints, "edits": edits}
                if editor.shared_adapter is not None:  # the edits, as one adapter PeftModel.from_pretrained loads
                    folder = output.with_name(f"{output.stem}.{method}.adapter")
                    editor.shared_adapter.save_pretrained(str(folder))
                    report["methods"][method]["adapter"] = str(folder)
                print(f"{method}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float)))
                continue
            if args.mode == "single":
                todo = [r for r in loaded.requests if (method, json.dumps([r.record_id])) not in earlier]
                rows = [earlier[(method, json.dumps([r.record_id]))] for r in loaded.requests if r not in todo]
                results = (editor.edit_single(r) for r in tqdm(todo, desc=f"{method} edits"))
            else:
                rows = []
                results = iter([editor.edit_batch(loaded.requests)])
            for result in results:
                row = _checked_row(result)
                rows.append(row)
                lines.write(json.dumps({"method": method, **row}, allow_nan=False) + "\n")
                lines.flush()
            failed += sum("failed" in row for row in rows)
            summary = summarize([row for row in rows if "failed" not in row])
            summary["failed"] = sum("failed" in row for row in rows)
            report["methods"][method] = {"summary": summary, "records": rows}
            print(f"{method}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float)))
    with output.open("w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, allow_nan=False, default=list)
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
        summary = output["methods"][method]["summary"]  # sequential mode: the last checkpoint (retention)
        values = [
            summary.get("retention" if n == "reliability" and "retention" in summary else n) or 0.0 for n in names
        ]
        axis.bar([j + i * width for j in range(len(names))], values, width=width, label=method)
    axis.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(names))], names)
    axis.set_ylim(0, 1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
