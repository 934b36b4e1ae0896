"""What the import-free loading hook (``peft-roselora-autoload.pth`` -> ``_peft_roselora_autoload``) costs processes
that never import peft, and processes that import torch (hundreds of imports, each asking the hook's finder).

    python benchmarks/autoload_startup.py [--runs 40]

Each sample is the wall time of a fresh interpreter running one command, with the hook on (default) and off
(``PEFT_ROSELORA_AUTOLOAD=0``), the two interleaved (on, off, off, on, ...) so that drifts in machine load hit both
alike. Commands: ``pass`` (interpreter start), ``import json`` (standard library), ``import torch`` (about a thousand
module imports, none of them peft). Prints the medians, their difference and ratio, and the paired difference
(median over pairs of on - off); writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


COMMANDS = {"start": "pass", "stdlib": "import json", "torch": "import torch"}
VARIABLE = "PEFT_ROSELORA_AUTOLOAD"


def sample(code: str, hook_on: bool) -> float:
    env = dict(os.environ)
    env.pop(VARIABLE, None)
    if not hook_on:
        env[VARIABLE] = "0"
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - begin


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="pairs per command")
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--output", default="benchmarks/results/autoload_startup.json")
    args = parser.parse_args(argv)
    check = subprocess.run(
        [sys.executable, "-c", "import sys; print('_peft_roselora_autoload' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if check.stdout.strip() != "True":
        raise SystemExit("the autoload hook is not installed in this environment (pip install -e . installs it)")
    results = {}
    for name in args.commands:
        code = COMMANDS[name]
        sample(code, True), sample(code, False)  # warm the file cache
        on, off, paired = [], [], []
        for index in range(args.runs):
            order = (True, False) if index % 2 == 0 else (False, True)
            times = {hook_on: sample(code, hook_on) for hook_on in order}
            on.append(times[True])
            off.append(times[False])
            paired.append(times[True] - times[False])
        results[name] = {
            "command": code,
            "hook_on_median_s": statistics.median(on),
            "hook_off_median_s": statistics.median(off),
            "ratio_on_over_off": statistics.median(on) / statistics.median(off),
            "paired_difference_median_ms": 1e3 * statistics.median(paired),
            "off_spread_ms": 1e3 * (statistics.quantiles(off, n=4)[2] - statistics.quantiles(off, n=4)[0]),
        }
        row = results[name]
        print(
            f"{name:<7} {code!r:<16} on {row['hook_on_median_s'] * 1e3:8.1f} ms  "
            f"off {row['hook_off_median_s'] * 1e3:8.1f} ms  ratio {row['ratio_on_over_off']:.3f}  "
            f"paired on-off {row['paired_difference_median_ms']:+.2f} ms"
            f"  (off interquartile range {row['off_spread_ms']:.1f} ms)"
        )
    output = {"machine": platform.platform(), "python": sys.version.split()[0], "runs": args.runs, **results}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(output, handle, indent=1)
    return output


if __name__ == "__main__":
    main()
