"""Batch editing: N edits in one run (one adapter, one loss; one MEMIT / AlphaEdit update), N in {1, 10, 100, all}.

    python benchmarks/editing/batch.py --data ../shared/data/zsre/zsre_mend_eval_subset.json   # after search.py
    python benchmarks/editing/batch.py --quick --data tests/fixtures/zsre_sample.json           # CI's smoke run

Each method runs at the configuration ``search.py`` chose on the dev records (``--configs``, its output). On the
test records: for N smaller than ``--small-pool`` (default 40) the first ``--small-pool`` test records are edited in
consecutive batches of N (each batch from the unedited model) and the metrics averaged over every edited record; for
larger N the first N test records are one batch ("all": every test record). Every batch's result is appended to
``<output stem>.jsonl`` as it finishes, and a rerun resumes from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from run import HERE, add_model_arguments, prepare, text_sample, use_quick_model
from search import METRICS, chosen_configs, hyper_parameters, weighted_mean
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from peft_roselora.editing import METHODS, Editor


def batch_sizes(text: str) -> str | int:
    return text if text == "all" else int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[str(HERE.parent / "results" / "editing_search.json")],
        help="search.py output(s) with the chosen configurations (several files: their methods merged)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=batch_sizes, default=[1, 10, 100, "all"])
    parser.add_argument("--small-pool", type=int, default=40)
    parser.add_argument(
        "--side", choices=["test", "dev"], default="test", help="edit the test (report) or dev (tuning) records"
    )
    parser.add_argument("--quick", action="store_true", help="12 records, a small base model, sizes 1 and all (CI)")
    parser.add_argument("--output", default=str(HERE.parent / "results" / "editing_batch.json"))
    args = parser.parse_args(argv)
    if args.quick:
        use_quick_model(args)
        args.sizes, args.small_pool = [1, "all"], 2
    try:
        chosen = chosen_configs(args.configs, args.methods, "batch.py")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        setup = prepare(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"batch.py: {error}", file=sys.stderr)
        return 2
    test = setup.test if args.side == "test" else setup.dev
    largest = max(len(test) if size == "all" else min(size, len(test)) for size in args.sizes)
    # the text sample never holds an edited record's text: on the dev side, the dev records after the edited ones
    texts = setup.texts if args.side == "test" else text_sample(setup, setup.dev[max(largest, args.small_pool) :])
    if not texts:
        print(
            "batch.py: --side dev needs sizes below the number of dev records (the rest is the text sample)",
            file=sys.stderr,
        )
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stream = output.with_suffix(".jsonl")
    done = {}
    if stream.exists():
        for line in stream.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], row["size"], row["first"])] = row
    report = {
        "data": args.data,
        "model": str(setup.model_path),
        "side": args.side,
        "test_records": len(test),
        "methods": {},
    }
    for method in args.methods:
        report["methods"][method] = {"config": chosen[method], "sizes": {}}
        for size in args.sizes:
            n = len(test) if size == "all" else min(size, len(test))
            pool = test[: max(n, args.small_pool)] if n < args.small_pool else test[:n]
            batches = [pool[i : i + n] for i in range(0, len(pool) - n + 1, n)]
            rows = []
            for batch in tqdm(batches, desc=f"{method} N={size}"):
                key = (method, str(size), test.index(batch[0]))
                if key not in done:
                    torch.manual_seed(args.seed)
                    model = AutoModelForCausalLM.from_pretrained(setup.model_path)
                    editor = Editor(model, setup.tokenizer, hyper_parameters(method, chosen[method]), texts)
                    result = editor.edit_batch(batch)
                    done[key] = {
                        "method": method,
                        "size": str(size),
                        "first": key[2],
                        "edits": len(batch),
                        **{k: v for k, v in result.to_dict().items() if k not in ("losses", "record_ids")},
                        "changed_fraction_of_all": result.changed_weights / sum(p.numel() for p in model.parameters()),
                    }
                    with stream.open("a") as lines:
                        lines.write(json.dumps(done[key]) + "\n")
                rows.append(done[key])

            summary = {
                "edits": sum(r["edits"] for r in rows),
                "batches": len(rows),
                **{name: weighted_mean((r[name], r["edits"]) for r in rows) for name in METRICS},
                "changed_fraction_of_all": statistics.fmean(r["changed_fraction_of_all"] for r in rows),
                "seconds_per_batch": statistics.fmean(r["seconds"] for r in rows),
            }
            report["methods"][method]["sizes"][str(size)] = summary
            print(
                f"{method:<10} N={str(size):<4} reliability {summary['reliability']:.3f} generalisation "
                f"{summary['generalization']:.3f} locality {summary['locality']:.3f} changed "
                f"{summary['changed_fraction_of_all']:.5f} ({summary['batches']} batch(es), "
                f"{summary['seconds_per_batch']:.1f} s each)",
                flush=True,
            )
    output.write_text(json.dumps(report, indent=1))
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
