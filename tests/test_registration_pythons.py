"""The real ``PeftType.ROSELORA`` member works on Python 3.10-3.13 (checked on every interpreter on this machine)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest


CHECK = Path(__file__).resolve().parent / "peftype_member_check.py"


def _interpreter(version: str) -> str | None:
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_peft_type_member_on_python(version):
    interpreter = _interpreter(version)
    if interpreter is None:
        pytest.skip(f"no working python{version} on this machine")
    result = subprocess.run([interpreter, "-I", str(CHECK)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
