"""``benchmarks/results/`` holds only what the documentation cites: every file there is named in README.md or a page
under docs/ (by its file name), and every results file the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _docs_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in DOCS)


def test_every_results_file_is_cited_in_the_docs():
    text = _docs_text()
    files = [path for path in RESULTS.rglob("*") if path.is_file()]
    assert files, "benchmarks/results/ is empty"
    uncited = sorted(str(path.relative_to(RESULTS)) for path in files if path.name not in text)
    assert not uncited, f"files in benchmarks/results/ that no doc cites (delete them or cite them): {uncited}"


def test_every_cited_results_file_exists():
    cited = set(re.findall(r"(?:benchmarks/|\.\./)results/([\w.\-/]+\.(?:jsonl|json|md|csv))\b", _docs_text()))
    missing = sorted(name for name in cited if not (RESULTS / name).exists())
    assert not missing, f"docs cite results files that do not exist: {missing}"
