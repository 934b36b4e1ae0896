"""transformers' adapter API against the installed PEFT: the combination is named with both versions and the fix."""

from __future__ import annotations

import importlib.metadata

import pytest
from packaging.version import Version
from transformers.integrations import peft as transformers_peft

import peft_roselora
from peft_roselora.compat import transformers_adapter_api_problem


def test_transformers_5_24_with_peft_0_21_is_named_with_both_versions_and_the_fix():
    message = transformers_adapter_api_problem("5.24.0", "0.21.2", "0.22.0")
    assert message.startswith("transformers 5.24.0 requires peft >= 0.22.0 for its adapter API")
    assert "peft 0.21.2 is installed" in message
    assert "pip install 'transformers>=5.23,<5.24'" in message


@pytest.mark.parametrize("minimum", ["0.20.0", "0.21.2"])
def test_compatible_combinations_pass(minimum):
    assert transformers_adapter_api_problem("5.23.0", "0.21.2", minimum) is None


def test_a_transformers_without_a_minimum_peft_passes(monkeypatch):
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", None)
    assert transformers_adapter_api_problem("5.23.0", "0.21.2") is None


def adapter_api_refused() -> bool:
    """Whether the installed transformers demands a newer peft for its adapter API (transformers >= 5.24)."""
    minimum = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
    return minimum is not None and Version(importlib.metadata.version("peft")) < Version(minimum)


def test_installed_versions_follow_the_installed_transformers():
    # transformers 5.23 accepts peft 0.21.x in its adapter API; 5.24+ refuses it: the check says so, naming both
    if not adapter_api_refused():
        assert transformers_adapter_api_problem() is None
        peft_roselora.check_transformers_adapter_api()
        return
    installed = importlib.metadata.version("transformers")
    assert transformers_adapter_api_problem().startswith(f"transformers {installed} requires peft >=")
    with pytest.raises(RuntimeError, match="pip install 'transformers>=5.23,<5.24'"):
        peft_roselora.check_transformers_adapter_api()


def test_check_raises_when_transformers_demands_a_newer_peft(monkeypatch):
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "0.22.0")
    installed_peft = importlib.metadata.version("peft")
    installed_transformers = importlib.metadata.version("transformers")
    with pytest.raises(RuntimeError) as error:
        peft_roselora.check_transformers_adapter_api()
    assert f"transformers {installed_transformers} requires peft >= 0.22.0" in str(error.value)
    assert f"peft {installed_peft} is installed" in str(error.value)
    with pytest.warns(UserWarning, match="requires peft >= 0.22.0"):
        peft_roselora.warn_if_transformers_adapter_api_is_broken()
