"""Register RoseLoRA with PEFT in processes that never ``import peft_roselora`` (installed with the package).

The ``peft-roselora-autoload.pth`` file that the package installs into ``site-packages`` imports this module at
interpreter start. It only puts a finder at the front of ``sys.meta_path`` that waits for the top-level ``peft``
package to be imported; when ``peft`` has finished importing, the finder imports ``peft_roselora`` (which registers
``PeftType.ROSELORA``, ``RoseLoraConfig`` and ``RoseLoraModel``) and removes itself. So ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM``, transformers' ``load_adapter`` and TRL load RoseLoRA adapters without the import.

- A process that never imports ``peft`` pays this module's import and one string comparison per import that misses
  ``sys.modules`` (measured by ``benchmarks/autoload_startup.py``: no measurable start-up difference).
- Nothing here raises: a failure while registering is reported as a warning, and ``peft`` itself imports normally.
- ``PEFT_ROSELORA_AUTOLOAD=0`` (or ``false`` / ``no`` / ``off``) switches it off; then ``import peft_roselora``
  is needed again before loading a RoseLoRA adapter.

This module must stay cheap and must not import ``peft``, ``torch`` or ``peft_roselora`` at start-up.
"""

from __future__ import annotations

import os
import sys


ENVIRONMENT_VARIABLE = "PEFT_ROSELORA_AUTOLOAD"
_OFF_VALUES = {"0", "false", "no", "off"}


def enabled() -> bool:
    """Whether the environment lets the hook run (``PEFT_ROSELORA_AUTOLOAD`` unset or not an off value)."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() not in _OFF_VALUES


# set while registration waits for a module that was still being imported when peft finished (a circular import:
# some package imports peft from inside its own import); retried at the next import once that module is complete
_waiting_for: list = []


def _register() -> None:
    try:
        import peft_roselora  # noqa: F401  (registers RoseLoraConfig / RoseLoraModel with PEFT on import)
    except ImportError as error:
        blocking = sys.modules.get(error.name or "")
        if blocking is not None and getattr(getattr(blocking, "__spec__", None), "_initializing", False):
            _waiting_for[:] = [blocking]
            sys.meta_path.insert(0, PeftImportWatcher())
            return
        _warn(error)
    except Exception as error:  # never break the user's `import peft`
        _warn(error)


def _warn(error: BaseException) -> None:
    import warnings

    warnings.warn(
        f"peft-roselora could not register RoseLoRA with PEFT automatically ({type(error).__name__}: {error}); "
        f"`import peft_roselora` before loading RoseLoRA adapters, or set {ENVIRONMENT_VARIABLE}=0 to silence "
        "this.",
        RuntimeWarning,
        stacklevel=3,
    )


class _RegisteringLoader:
    """Wraps the real loader of ``peft``: executes the module, then registers RoseLoRA."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _uninstall()
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class PeftImportWatcher:
    """A ``sys.meta_path`` finder that answers only for ``peft``: it finds ``peft``'s real spec with the other
    finders and wraps its loader so that RoseLoRA is registered right after ``peft`` is executed, then leaves
    ``sys.meta_path``. (``importlib.util.find_spec("peft")``, as availability checks call it, executes nothing: the
    watcher stays until the real import.)"""

    def find_spec(self, fullname, path=None, target=None):
        if _waiting_for:
            if not getattr(getattr(_waiting_for[0], "__spec__", None), "_initializing", False):
                _waiting_for.clear()
                _uninstall()
                _register()
            return None
        if fullname != "peft":
            return None
        for finder in sys.meta_path:
            if isinstance(finder, PeftImportWatcher):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftImportWatcher)]


def install() -> None:
    """Put the watcher in place (idempotent); register at once if ``peft`` is already imported."""
    if not enabled():
        return
    if "peft" in sys.modules:
        _register()
        return
    if not any(isinstance(finder, PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftImportWatcher())


try:
    install()
except Exception:  # pragma: no cover - an interpreter start must never fail because of this hook
    pass
