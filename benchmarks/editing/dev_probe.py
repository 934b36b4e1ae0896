"""A hand-written grid of configurations, single edits of the first dev records each: how the defaults were chosen.

    python benchmarks/editing/dev_probe.py --model smollm2 --data ../shared/data/zsre/zsre_mend_eval_subset.json \
        --grid benchmarks/editing/grids/smollm2_roselora.json --records 12

For every configuration of ``--grid`` (a JSON list of ``EditHyperParams.from_config`` dicts, ``method`` optional,
default RoseLoRA): ``edit_single`` of the first ``--records`` dev records (never a test record; ``--split test``:
the first test records instead, to report configurations chosen on the dev records) from the unedited model, under
``torch.manual_seed(0)``; one line per configuration with the means of reliability, generalisation and locality,
the changed fraction of the model's weights, the mean steps and the seconds per edit (measurement included).
``--output`` (JSON lines) gets the same, appended.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from run import add_model_arguments, prepare, use_quick_model
from transformers import AutoModelForCausalLM

from peft_roselora.editing import EditHyperParams, Editor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--grid", required=True, help="JSON list of configurations")
    parser.add_argument("--records", type=int, default=12, help="dev records per configuration (default 12)")
    parser.add_argument("--split", choices=("dev", "test"), default="dev", help="records to edit (default dev)")
    parser.add_argument("--output", default=None, help="JSON lines file the results are appended to")
    parser.add_argument("--quick", action="store_true", help="12 records, a small base model (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        use_quick_model(args)
    if args.records < 1:
        parser.error(f"--records must be >= 1, got {args.records}")
    try:
        grid = json.loads(Path(args.grid).read_text())
        setup = prepare(args)
    except (OSError, ValueError) as error:
        print(f"dev_probe.py: {error}", file=sys.stderr)
        return 2
    if not isinstance(grid, list) or not all(isinstance(config, dict) for config in grid):
        print(f"dev_probe.py: --grid {args.grid} must hold a JSON list of objects", file=sys.stderr)
        return 2
    requests = (setup.dev if args.split == "dev" else setup.test)[: args.records]
    for config in grid:
        config = dict(config)
        method = config.pop("method", "roselora")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(setup.model_path)
        editor = Editor(model, setup.tokenizer, EditHyperParams.from_config(method, config), stats_texts=setup.texts)
        start = time.perf_counter()
        rows = [editor.edit_single(request) for request in requests]
        seconds = (time.perf_counter() - start) / len(rows)
        total = sum(parameter.numel() for parameter in model.parameters())

        def mean(name, rows=rows):
            values = [getattr(row, name) for row in rows if getattr(row, name) is not None]
            return statistics.fmean(values) if values else None

        result = {
            "split": args.split,
            "method": method,
            "config": config,
            "records": len(rows),
            "reliability": mean("reliability"),
            "generalization": mean("generalization"),
            "locality": mean("locality"),
            "changed_fraction_of_all": statistics.fmean(row.changed_weights / total for row in rows),
            "steps": mean("steps"),
            "seconds_per_edit": seconds,
        }
        print(
            f"{method} {config} rel {result['reliability']:.2f} gen {result['generalization']:.2f} loc "
            f"{result['locality']:.2f} changed {result['changed_fraction_of_all'] * 100:.3f}% steps "
            f"{result['steps']:.1f} s/edit {seconds:.1f}",
            flush=True,
        )
        if args.output:
            with open(args.output, "a") as lines:
                lines.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
