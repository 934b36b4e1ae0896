"""Sequential editing: the test records edited one after another into the same model, measured at checkpoints.

    python benchmarks/editing/sequential.py --data ../shared/data/zsre/zsre_mend_eval_subset.json   # after search.py
    python benchmarks/editing/sequential.py --quick --data tests/fixtures/zsre_sample.json           # CI's smoke run

Every method runs at the configuration ``search.py`` chose on the dev records (``--configs``); ``roselora+many``
(and ``lora+many``) is that configuration with the many-edit mode on (``--replay`` earlier edits in every step's
loss, ``--preserve-weight`` times the cross-entropy of the unedited model's predictions on ``--preserve-batch``
texts of the dev records' training text; see docs/editing.md). At each checkpoint (``--checkpoints``, default 10,
100 and all) every edit so far is measured on the current model: retention (reliability), generalisation, locality
(against the unedited model) and the fraction of base weights that differ from the unedited model's.

Nothing is lost: each edit's immediate result and each checkpoint are appended to ``<output stem>.jsonl``; the
editor's state is saved (safetensors) at every checkpoint under ``<output stem>.state/``, and a rerun resumes each
method from its last saved checkpoint, ending exactly where an uninterrupted run does (edit ``i`` runs under seed
``edit_seed + i``; ``--edit-seed`` defaults to ``--seed``, which also seeds the base model's training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from run import HERE, add_model_arguments, glue_sample_description, prepare, text_sample, use_quick_model
from search import chosen_configs, hyper_parameters
from transformers import AutoModelForCausalLM

from peft_roselora.editing import METHODS, Editor
from peft_roselora.editing.sequence import run_sequence


MANY_EDIT = "+many"
SHARED = "+shared"  # the many-edit mode on one adapter kept across the sequence (EditHyperParams.shared_adapter)


def base_method(method: str) -> str:
    return method.removesuffix(MANY_EDIT).removesuffix(SHARED)


def parse_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs (VALUE read as JSON, else as a string) as a dict.

    Raises:
        ValueError: a pair without ``=``.
    """
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set {pair!r}: expected KEY=VALUE, e.g. keep_ratio=0.2 or target_modules='[\"q_proj\"]'"
            )
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def plot_sequence(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    colors = plt.get_cmap("tab20")
    for index, (method, data) in enumerate(report["methods"].items()):
        points = data["checkpoints"]
        edits = [p["edits"] for p in points]
        style = "--o" if "+" in method else "-o"  # the many-edit modes dashed
        for axis, name in zip(axes, ("retention", "locality", "changed_fraction_of_all")):
            axis.plot(edits, [p[name] for p in points], style, color=colors(index % 20), label=method, ms=4)
            axis.set_title(name.replace("_", " "))
            axis.set_xscale("log")
            axis.set_xlabel("edits")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[str(HERE.parent / "results" / "editing_search.json")],
        help="search.py output(s) with the chosen configurations (several files: their methods merged)",
    )
    names = [*METHODS, *(m + suffix for suffix in (MANY_EDIT, SHARED) for m in ("roselora", "lora"))]
    parser.add_argument("--methods", nargs="+", default=names, choices=names)
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--edits", type=int, default=None, help="first N test records (default all)")
    parser.add_argument("--replay", type=int, default=8, help="many-edit mode: earlier edits replayed per step")
    parser.add_argument(
        "--preserve-weight", type=float, default=5.0, help="many-edit mode: weight of the preservation loss"
    )
    parser.add_argument("--preserve-batch", type=int, default=8, help="many-edit mode: texts per step")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="many-edit methods (+many, +shared): override fields of the chosen configuration (VALUE is JSON), "
        "e.g. --set r=16 keep_ratio=0.2",
    )
    parser.add_argument(
        "--side", choices=["test", "dev"], default="test", help="edit the test (report) or dev (tuning) records"
    )
    parser.add_argument(
        "--edit-seed",
        type=int,
        default=None,
        help="seed of the edits (edit i runs under EDIT_SEED + i; default --seed, which also seeds the base model's "
        "training): another edit seed repeats a sequence on the same base model",
    )
    parser.add_argument("--quick", action="store_true", help="12 records, a small base model (CI)")
    parser.add_argument("--output", default=str(HERE.parent / "results" / "editing_sequential.json"))
    parser.add_argument("--plot", default=None, help="PNG of retention, locality and changed weights per checkpoint")
    args = parser.parse_args(argv)
    if args.edit_seed is None:
        args.edit_seed = args.seed
    if args.quick:
        use_quick_model(args)
        args.checkpoints = [2]
    try:
        chosen = chosen_configs(args.configs, [base_method(m) for m in args.methods], "sequential.py")
        settings = parse_settings(args.set)
        if settings and all(m == base_method(m) for m in args.methods):
            raise ValueError(
                f"sequential.py: --set applies to the many-edit methods (+many, +shared), not {args.methods}"
            )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        setup = prepare(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"sequential.py: {error}", file=sys.stderr)
        return 2
    side = setup.test if args.side == "test" else setup.dev
    requests = side[: args.edits] if args.edits else side
    # the text sample never holds an edited record's text: on the dev side, the dev records after the edited ones
    texts = setup.texts if args.side == "test" else text_sample(setup, setup.dev[len(requests) :])
    if not texts:
        print(
            "sequential.py: --side dev needs --edits below the number of dev records (the rest is the text sample)",
            file=sys.stderr,
        )
        return 2
    checkpoints = sorted({c for c in args.checkpoints if c < len(requests)} | {len(requests)})
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stream = output.with_suffix(".jsonl")
    states = output.with_suffix(".state")
    states.mkdir(exist_ok=True)
    seed_file = states / "edit_seed.json"
    # a state saved before edit seeds were recorded ran under --seed
    saved_seed = json.loads(seed_file.read_text()) if seed_file.exists() else None
    if saved_seed is None and any(states.glob("*.safetensors")):
        saved_seed = args.seed
    if saved_seed is not None and saved_seed != args.edit_seed:
        print(
            f"sequential.py: --edit-seed {args.edit_seed}, but {states} holds a run with edit seed {saved_seed}: "
            "resume with that seed or choose another --output",
            file=sys.stderr,
        )
        return 2
    seed_file.write_text(json.dumps(args.edit_seed))
    measured = {}
    if stream.exists():
        for line in stream.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == "checkpoint":
                measured[(row["method"], row["edits"])] = row
    report = {
        "data": args.data,
        "model": str(setup.model_path),
        "side": args.side,
        "edits": len(requests),
        "edit_seed": args.edit_seed,
        "text_sample": glue_sample_description(setup) or f"{len(texts)} training texts of dev records not edited",
        "many_edit_mode": {
            "replay": args.replay,
            "preserve_weight": args.preserve_weight,
            "preserve_batch": args.preserve_batch,
            "set": settings,
        },
        "methods": {},
    }
    for method in args.methods:
        base = base_method(method)
        config = dict(chosen[base])
        if method != base:
            config.update(replay=args.replay, preserve_weight=args.preserve_weight, preserve_batch=args.preserve_batch)
            config.update(settings, shared_adapter=method.endswith(SHARED))
        try:
            hparams = hyper_parameters(base, config)
        except ValueError as error:
            print(f"sequential.py: {method}: {error}", file=sys.stderr)
            return 2
        model = AutoModelForCausalLM.from_pretrained(setup.model_path)
        editor = Editor(model, setup.tokenizer, hparams, stats_texts=texts)

        def write(row, method=method):
            with stream.open("a") as lines:
                lines.write(json.dumps({"method": method, **row}) + "\n")

        def compact_row(index, result):
            return {"kind": "edit", "index": index, "reliability": result.reliability, "steps": result.steps}

        def on_checkpoint(checkpoint, row, method=method):
            measured[(method, checkpoint.edits)] = {"method": method, **row}
            print(
                f"\n{method:<15} after {checkpoint.edits:>4} edits: retention {checkpoint.retention:.3f} "
                f"generalisation {checkpoint.generalization:.3f} locality {checkpoint.locality:.3f} changed "
                f"{row['changed_fraction_of_all']:.5f} of all base weights, {checkpoint.seconds:.0f} s editing",
                flush=True,
            )

        run_sequence(
            editor,
            requests,
            state_path=states / f"{method}.safetensors",
            write=write,
            checkpoints=checkpoints,
            seed=args.edit_seed,
            edit_row=compact_row,
            on_checkpoint=on_checkpoint,
            label=f"{method} sequential edits",
        )
        report["methods"][method] = {
            "config": config,
            "checkpoints": [measured[(method, c)] for c in checkpoints if (method, c) in measured],
        }
    output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_sequence(report, args.plot)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
