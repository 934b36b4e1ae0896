"""Print the installed versions that differ from a pip constraints file (CI's lock), one line each.

python .ci/compare_versions.py .ci/constraints.txt --label newest
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re


def read_lock(path: str) -> dict[str, str]:
    """``{normalised name: version}`` of the ``name==version`` lines of a constraints file."""
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    return {normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lock")
    parser.add_argument("--label", default="installed")
    args = parser.parse_args()
    lock, present = read_lock(args.lock), installed()
    differences = []
    for name in sorted(set(lock) | set(present)):
        if name in ("peft-roselora", "pip", "setuptools", "wheel"):
            continue
        locked, now = lock.get(name), present.get(name)
        if now is not None and locked is not None and now.split("+")[0] == locked.split("+")[0]:
            continue
        differences.append(f"  {name}: lock {locked or '-'} -> {args.label} {now or '-'}")
    print(f"== {args.label}: {len(differences)} package(s) differ from {args.lock}")
    print("\n".join(differences))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
