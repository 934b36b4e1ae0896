"""What an edit costs in the many-edit mode against a single edit, on the same model, in the same process.

    python benchmarks/editing/edit_cost.py --data ../shared/data/zsre/zsre_mend_eval_subset.json   # SmolLM2
    python benchmarks/editing/edit_cost.py --quick --data tests/fixtures/zsre_sample.json            # CI's smoke run

Single: ``edit_single`` of ``--records`` test records from the unedited model at the base configuration
(``--config``, a JSON object of ``EditHyperParams`` fields; default the ``EditHyperParams()`` defaults). Sequential:
``--warm`` dev records edited one after another at that configuration with the many-edit mode on (``--replay``
earlier edits, ``--replay-priority`` of them drawn by loss among at most ``--replay-score-limit`` scored ones, and
``--preserve-batch`` texts of the text sample, their first ``--preserve-tokens``, at ``--preserve-weight``, in every
``--many-edit-every``-th step; optional ``--shared-adapter``), then the same test records, each timed (use
``--warm`` >= ``--replay`` so every timed edit replays in full). What grows with the number of earlier edits is the
prioritised replay's scoring of the earlier edits as an edit starts (one no-grad pass over every one, or over
``--replay-score-limit`` of them): it is timed on ``--pool`` dev records and added to give the cost after that many
edits. Printed and written (``--output``): the median seconds per edit (editing only, measurement excluded), the
ratios, and the median steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from run import HERE, add_model_arguments, prepare, use_quick_model
from transformers import AutoModelForCausalLM

from peft_roselora.editing import EditHyperParams, Editor


def _hparams(config: dict, **overrides) -> EditHyperParams:
    return EditHyperParams.from_config(config.get("method", "roselora"), {**config, **overrides})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(model="smollm2")
    parser.add_argument("--config", default="{}", help="base configuration, a JSON object (default: the defaults)")
    parser.add_argument("--records", type=int, default=6, help="edits timed per mode (default 6)")
    parser.add_argument("--pool", type=int, default=100, help="earlier edits the scoring is timed on (default 100)")
    parser.add_argument("--warm", type=int, default=3, help="edits made before the timed ones (default 3)")
    parser.add_argument("--replay", type=int, default=4)
    parser.add_argument("--replay-priority", type=float, default=1.0)
    parser.add_argument(
        "--replay-score-limit",
        type=int,
        default=None,
        help="earlier edits scored as an edit starts (default: every one, see EditHyperParams.replay_score_limit)",
    )
    parser.add_argument("--preserve-weight", type=float, default=1.0)
    parser.add_argument("--preserve-batch", type=int, default=2)
    parser.add_argument(
        "--preserve-tokens", type=int, default=None, help="tokens of each preservation text (default: whole texts)"
    )
    parser.add_argument(
        "--many-edit-every", type=int, default=1, help="replay and preservation every this many steps (default 1)"
    )
    parser.add_argument("--shared-adapter", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small trained base, 2 records, pool 4 (CI)")
    parser.add_argument("--output", default=str(HERE.parent / "results" / "edit_cost.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model = None
        use_quick_model(args)
        args.records, args.pool, args.warm = 2, 4, 1
    if args.warm < 1 or args.pool < 1 or args.records < 1:
        print("edit_cost.py: --records, --warm and --pool must be >= 1", file=sys.stderr)
        return 2
    try:
        config = json.loads(args.config)
        base = _hparams(config)
        many = _hparams(
            config,
            replay=args.replay,
            replay_priority=args.replay_priority,
            replay_score_limit=args.replay_score_limit,
            preserve_weight=args.preserve_weight,
            preserve_batch=args.preserve_batch,
            preserve_tokens=args.preserve_tokens,
            many_edit_every=args.many_edit_every,
            shared_adapter=args.shared_adapter,
        )
        setup = prepare(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"edit_cost.py: {error}", file=sys.stderr)
        return 2
    timed = setup.test[: args.records]
    pool = setup.dev[: args.pool]
    if len(timed) < args.records or len(pool) < args.pool or len(setup.dev) < args.warm:
        print(f"edit_cost.py: {len(setup.test)} test / {len(setup.dev)} dev records are too few", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    single = Editor(
        AutoModelForCausalLM.from_pretrained(setup.model_path), setup.tokenizer, base, stats_texts=setup.texts
    )
    single_rows = [single.edit_single(request) for request in timed]

    torch.manual_seed(0)
    editor = Editor(
        AutoModelForCausalLM.from_pretrained(setup.model_path), setup.tokenizer, many, stats_texts=setup.texts
    )
    warm = setup.dev[: args.warm]
    editor.edit_sequence(warm, seed=0)
    seconds, steps = [], []
    done = editor.seconds_editing

    def on_edit(index, result) -> None:
        nonlocal done
        seconds.append(editor.seconds_editing - done)
        done = editor.seconds_editing
        steps.append(result.steps)

    editor.edit_sequence(warm + timed, on_edit=on_edit, seed=0)
    start = time.perf_counter()
    editor.objective.replay_priorities(editor.model, pool)  # what the scoring costs after --pool edits
    scoring = time.perf_counter() - start

    report = {
        "model": str(setup.model_path),
        "single_config": dataclasses.asdict(base),
        "many_edit": {
            "replay": args.replay,
            "replay_priority": args.replay_priority,
            "replay_score_limit": args.replay_score_limit,
            "preserve_weight": args.preserve_weight,
            "preserve_batch": args.preserve_batch,
            "preserve_tokens": args.preserve_tokens,
            "many_edit_every": args.many_edit_every,
            "shared_adapter": args.shared_adapter,
            "warm": args.warm,
        },
        "records": args.records,
        "single_seconds": [row.seconds for row in single_rows],
        "single_steps": [row.steps for row in single_rows],
        "sequential_seconds": seconds,
        "sequential_steps": steps,
    }
    report["single_median_s"] = statistics.median(report["single_seconds"])
    report["sequential_median_s"] = statistics.median(seconds)
    report["ratio"] = report["sequential_median_s"] / report["single_median_s"]
    report["pool"] = args.pool
    report["scoring_seconds_at_pool"] = scoring
    report["ratio_at_pool"] = (report["sequential_median_s"] + scoring) / report["single_median_s"]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=str))
    print(
        f"single edit {report['single_median_s']:.2f} s (median steps {statistics.median(report['single_steps'])}), "
        f"many-edit sequential edit after {args.warm} edits {report['sequential_median_s']:.2f} s (median steps "
        f"{statistics.median(steps)}): ratio {report['ratio']:.2f}x; scoring {args.pool} earlier edits "
        f"{scoring:.2f} s: ratio after {args.pool} edits at most {report['ratio_at_pool']:.2f}x; written to {output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
