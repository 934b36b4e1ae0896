"""Version compatibility checks between the libraries RoseLoRA sits on.

transformers' adapter API (``PreTrainedModel.add_adapter``, ``set_adapter``, ``delete_adapter``,
``get_adapter_state_dict``, ...) refuses PEFT releases below its ``MIN_PEFT_VERSION``. transformers 5.24.0 raised that
minimum to 0.22.0 before PEFT 0.22 existed, while RoseLoRA pins PEFT 0.21.x (its ``LoraVariant`` hooks are private
API). With such a combination the adapter API fails for every PEFT method with a message that asks for a PEFT that
cannot be installed; :func:`check_transformers_adapter_api` names both versions and the way out instead.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Optional

from packaging.version import Version


# the transformers releases whose adapter API accepts peft 0.21.x: the way out of an incompatible combination (the
# package itself declares transformers>=5.23 with no upper bound; only this API is affected)
SUPPORTED_TRANSFORMERS = ">=5.23,<5.24"


def transformers_adapter_api_problem(
    transformers_version: Optional[str] = None,
    peft_version: Optional[str] = None,
    min_peft_version: Optional[str] = None,
) -> Optional[str]:
    """Why transformers' adapter API cannot work with the installed PEFT, or ``None`` when it can.

    Args:
        transformers_version (str | None): defaults to the installed transformers.
        peft_version (str | None): defaults to the installed peft.
        min_peft_version (str | None): the minimum PEFT transformers' adapter API accepts; defaults to
            ``transformers.integrations.peft.MIN_PEFT_VERSION`` (``None`` there means no minimum).

    Returns:
        str | None: a one-paragraph message naming both versions and the fix.
    """
    if transformers_version is None:
        transformers_version = importlib.metadata.version("transformers")
    if peft_version is None:
        peft_version = importlib.metadata.version("peft")
    if min_peft_version is None:
        try:
            from transformers.integrations import peft as transformers_peft

            min_peft_version = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
        except ImportError:  # pragma: no cover - transformers without its PEFT integration
            return None
    if min_peft_version is None or Version(peft_version) >= Version(min_peft_version):
        return None
    return (
        f"transformers {transformers_version} requires peft >= {min_peft_version} for its adapter API "
        f"(add_adapter, set_adapter, delete_adapter, get_adapter_state_dict, ...), but peft {peft_version} is "
        f"installed and peft-roselora supports peft 0.21.x only. For that API install a transformers that accepts it: "
        f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'. PEFT's own API (get_peft_model, "
        "PeftModel.from_pretrained, model.load_adapter, ...) is not affected."
    )


def check_transformers_adapter_api() -> None:
    """Raise if transformers' adapter API cannot work with the installed PEFT.

    Raises:
        RuntimeError: the message of :func:`transformers_adapter_api_problem`.
    """
    problem = transformers_adapter_api_problem()
    if problem is not None:
        raise RuntimeError(problem)


def warn_if_transformers_adapter_api_is_broken() -> None:
    """Warn once at import when transformers' adapter API cannot work with the installed PEFT."""
    problem = transformers_adapter_api_problem()
    if problem is not None:
        warnings.warn(problem, UserWarning, stacklevel=3)
