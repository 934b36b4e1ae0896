"""Markdown tables of the editing protocol's results (the tables of docs/editing.md), from the scripts' JSON outputs.

    cd benchmarks/editing
    python report.py --search ../results/editing_search*.json --batch ../results/editing_batch*.json \
        --sequential ../results/editing_sequential*.json --frontier-plot ../../docs/images/editing_frontier.png \
        --sequential-plot ../../docs/images/editing_sequential.png

Several files of one kind (e.g. methods run in two processes) are merged by method; ``FILE::LABEL`` keeps two runs
of one method apart (its rows are named ``"<method> (LABEL)"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _merged(paths: list[str]) -> dict:
    """The methods of several result files; ``FILE::LABEL`` names that file's methods ``"<method> (LABEL)"`` (two
    runs of one method side by side)."""
    merged = {}
    for entry in paths:
        path, _, label = entry.partition("::")
        for method, data in json.loads(Path(path).read_text())["methods"].items():
            merged[f"{method} ({label})" if label else method] = data
    return merged


def _cell(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _config(config: dict) -> str:
    return (
        ", ".join(f"{k} {'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in config.items())
        or "defaults"
    )


def search_table(methods: dict) -> str:
    lines = [
        "| method | chosen configuration (dev) | dev rel. / loc. | test reliability | test generalisation | "
        "test locality | changed (of all base weights) | s / edit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, data in methods.items():
        dev, test = data["chosen_dev"], data["chosen_test"]
        lines.append(
            f"| {method} | {_config(data['chosen_config'])} | {_cell(dev['reliability'])} / {_cell(dev['locality'])} "
            f"| {_cell(test['reliability'])} | {_cell(test['generalization'])} | {_cell(test['locality'])} | "
            f"{_cell(test['changed_fraction_of_all'], 5)} | {_cell(test['seconds_per_edit'], 2)} |"
        )
    return "\n".join(lines)


def frontier_table(methods: dict) -> str:
    lines = ["| method | test frontier points (reliability / locality / changed of all) |", "|---|---|"]
    for method, data in methods.items():
        points = sorted(data["frontier_test"], key=lambda p: -p["locality"])
        cells = "; ".join(
            f"{_cell(p['reliability'])} / {_cell(p['locality'])} / {_cell(p['changed_fraction_of_all'], 4)}"
            for p in points
        )
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def batch_table(methods: dict) -> str:
    sizes = list(next(iter(methods.values()))["sizes"])
    lines = [
        "| method | " + " | ".join(f"N={s}: rel. / gen. / loc." for s in sizes) + " | changed (of all), N=all |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for method, data in methods.items():
        cells = [
            f"{_cell(v['reliability'])} / {_cell(v['generalization'])} / {_cell(v['locality'])}"
            for v in data["sizes"].values()
        ]
        last = list(data["sizes"].values())[-1]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_cell(last['changed_fraction_of_all'], 5)} |")
    return "\n".join(lines)


def sequential_table(methods: dict) -> str:
    lines = [
        "| method | edits | retention | generalisation | locality | changed (of all base weights) | editing s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, data in methods.items():
        for point in data["checkpoints"]:
            lines.append(
                f"| {method} | {point['edits']} | {_cell(point['retention'])} | {_cell(point['generalization'])} | "
                f"{_cell(point['locality'])} | {_cell(point['changed_fraction_of_all'], 5)} | {point['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", nargs="*", default=[])
    parser.add_argument("--batch", nargs="*", default=[])
    parser.add_argument("--sequential", nargs="*", default=[])
    parser.add_argument("--frontier-plot", default=None, help="PNG of the merged search results' frontier")
    parser.add_argument("--sequential-plot", default=None, help="PNG of the merged sequential checkpoints")
    args = parser.parse_args(argv)
    if args.frontier_plot:
        from search import plot_frontier

        first = json.loads(Path(args.search[0]).read_text())
        plot_frontier({**first, "methods": _merged(args.search)}, args.frontier_plot)
    if args.sequential_plot:
        from sequential import plot_sequence

        plot_sequence({"methods": _merged(args.sequential)}, args.sequential_plot)
    if args.search:
        methods = _merged(args.search)
        print("### Single edits at the dev-chosen configurations (test)\n\n" + search_table(methods) + "\n")
        print("### Reliability-locality frontier (test)\n\n" + frontier_table(methods) + "\n")
    if args.batch:
        print("### Batch editing (test)\n\n" + batch_table(_merged(args.batch)) + "\n")
    if args.sequential:
        print("### Sequential editing (test)\n\n" + sequential_table(_merged(args.sequential)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
