"""Documentation that runs: every Python block of README.md and docs/*.md is executed on tiny local models (in a
fresh process per file, with a local Hub for the sharing examples), or marked skipped with a reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_snippets import SKIP, python_blocks
from local_hub import LocalHub


REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUNNABLE = [path for path in DOCS if any(skip is None for _, _, skip in python_blocks(path))]


def test_every_python_block_runs_or_says_why_not():
    skipped = [(path.name, line, skip) for path in DOCS for line, _, skip in python_blocks(path) if skip is not None]
    for name, line, reason in skipped:
        assert len(reason) > 20, f"{name}:{line}: a skipped block needs a real reason, got {reason!r}"
    # a skip marker must sit directly above a python fence (a stray marker would skip nothing)
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            if SKIP.match(line):
                assert index + 1 < len(lines) and lines[index + 1] == "```python", f"{path.name}:{index + 1}"
    assert {path.name for path in RUNNABLE} >= {"README.md", "training.md", "usage.md", "editing.md"}


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[path.name for path in RUNNABLE])
def test_documentation_python_blocks_run(path, tmp_path, hub):
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN="hf_local_test_token",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="0",
        DOC_SNIPPETS_DIR=str(tmp_path / "work"),
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]),
    )
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "zsre.json").write_text((REPO / "tests" / "fixtures" / "zsre_sample.json").read_text())
    command = [sys.executable, str(REPO / "tests" / "doc_snippets.py"), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"python blocks of {path.name}" in result.stdout
