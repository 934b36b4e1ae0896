"""Deliberate one-line bugs, each against the tests that must notice it (a check of the test suite, not of the code).

    python .ci/mutation_check.py                 # every mutation (the multi-process ones take minutes each)
    python .ci/mutation_check.py --fast          # only those whose catching test is in the fast tier
    python .ci/mutation_check.py --list

For each mutation: the tracked tree is copied to a temporary folder, the one line is replaced there (the original
text must occur exactly once), and the named tests run against the copy (``PYTHONPATH`` puts the copy's
``peft_roselora`` first; checked before the tests run). A mutation is CAUGHT when pytest fails; the script exits
non-zero when any mutation survives or a line is not found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    fast: bool = True


MUTATIONS = [
    Mutation(
        "persistent mode: lora_A's pruned entries not scored -1",
        "peft_roselora/schedule.py",
        "selection_scores(importance_a, mask_a, self.persistent),",
        "importance_a,",
        ("tests/test_hardening.py::test_persistent_scores_put_pruned_entries_of_both_factors_last",),
    ),
    Mutation(
        "last_keep_ratio not restored from a schedule state",
        "peft_roselora/schedule.py",
        'self.last_keep_ratio = state["last_keep_ratio"]',
        "pass",
        ("tests/test_hardening.py::test_a_schedule_state_restores_the_last_keep_ratio_and_every_counter",),
    ),
    Mutation(
        "compact loader: non-decreasing indices accepted (duplicates)",
        "peft_roselora/compact.py",
        "(indices[:, 1:] > indices[:, :-1]).all()",
        "(indices[:, 1:] >= indices[:, :-1]).all()",
        ("tests/test_compact.py::test_every_mutation_kind_is_refused_and_the_original_loads_exactly",),
    ),
    Mutation(
        "prioritised replay count truncated (int, not round)",
        "peft_roselora/editing/objective.py",
        "by_loss = round(priority * count)",
        "by_loss = int(priority * count)",
        ("tests/test_editing_many.py::test_replay_picks_draws_the_forgotten_edits_first",),
    ),
    Mutation(
        "FSDP2: gathered rows padded on the wrong side",
        "peft_roselora/sharding.py",
        "padded[: local.shape[0]] = local",
        "padded[chunk - local.shape[0] :] = local",
        ("tests/test_fsdp2.py::test_custom_loop_under_fsdp2_equals_one_process",),
        fast=False,
    ),
    Mutation(
        "finiteness not agreed across processes",
        "peft_roselora/sparsity.py",
        "return sensitivities, agree(finite) if agree is not None else finite",
        "return sensitivities, finite",
        ("tests/test_fsdp2.py::test_a_non_finite_gradient_on_one_process_skips_the_update_on_every_process",),
        fast=False,
    ),
    Mutation(
        "ZeRO: the pruned fp32 master not written back",
        "peft_roselora/zero.py",
        "    safe_set_full_fp32_param(parameter, value)\n",
        "    pass\n",
        ("tests/test_deepspeed.py::test_zero_engine_in_a_custom_loop_equals_one_process",),
        fast=False,
    ),
]


def tracked_copy(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run(mutation: Mutation, pytest_args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="roselora-mutation-") as folder:
        copy = Path(folder)
        tracked_copy(copy)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.original) != 1:
            return f"LINE NOT FOUND ONCE ({text.count(mutation.original)} times)"
        target.write_text(text.replace(mutation.original, mutation.mutated))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}
        where = subprocess.run(
            [sys.executable, "-c", "import peft_roselora; print(peft_roselora.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(copy)):
            return f"ERROR: peft_roselora imported from {where!r}, not the mutated copy"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args, *mutation.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode == 1:
            return "CAUGHT"
        if result.returncode == 0:
            return "SURVIVED"
        return f"ERROR: pytest exit code {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="only the mutations the fast tier must catch")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    args, pytest_args = parser.parse_known_args(argv)
    chosen = [mutation for mutation in MUTATIONS if mutation.fast or not args.fast]
    failures = 0
    for mutation in chosen:
        if args.list:
            print(f"{mutation.name}: {mutation.path} -> {', '.join(mutation.tests)}")
            continue
        outcome = run(mutation, pytest_args)
        failures += outcome != "CAUGHT"
        print(f"{outcome.splitlines()[0]:<10} {mutation.name} ({mutation.path}) by {', '.join(mutation.tests)}")
        if outcome.startswith("ERROR"):
            print(outcome)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
