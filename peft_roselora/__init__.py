"""RoseLoRA (row and column-wise sparse low-rank adaptation) as a native PEFT method.

``import peft_roselora`` registers ``RoseLoraConfig`` / ``RoseLoraModel`` with PEFT, after which
``get_peft_model(model, RoseLoraConfig(...))``, ``PeftModel.from_pretrained`` and the rest of PEFT accept RoseLoRA
adapters. Processes that never import ``peft_roselora`` load RoseLoRA adapters too: the package installs a hook
(``_peft_roselora_autoload``, off with ``PEFT_ROSELORA_AUTOLOAD=0``) that registers RoseLoRA when ``peft`` is imported.
:func:`export_to_lora` writes an adapter that stock PEFT loads without this package.
"""

from ._registration import add_peft_type_member


add_peft_type_member()

from ._registration import register  # noqa: E402
from .compact import CompactFormatError, load_compact, save_compact  # noqa: E402
from .compat import check_transformers_adapter_api, warn_if_transformers_adapter_api_is_broken  # noqa: E402
from .config import RoseLoraConfig  # noqa: E402
from .export import export_to_lora  # noqa: E402
from .hub import push_to_hub, push_trainer_to_hub  # noqa: E402
from .layer import RoseLoraLayer, RoseLoraVariant  # noqa: E402
from .model import RoseLoraModel  # noqa: E402
from .schedule import AdapterSchedule, ScheduleStateError  # noqa: E402
from .sparsity import ModuleSparsity, SparsityReport  # noqa: E402
from .training import register_optimizer_hooks  # noqa: E402


register()
warn_if_transformers_adapter_api_is_broken()

# The Trainer integration imports transformers' trainer modules; it is loaded on first use, so that importing the
# package (also from inside transformers' or TRL's own imports, through the import-free loading hook
# _peft_roselora_autoload) never depends on a transformers module that is still being imported.
_LAZY = {"RoseLoraCallback": "callback", "UnsupportedSetupError": "callback"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.2.0.dev0"

__all__ = [
    "AdapterSchedule",
    "CompactFormatError",
    "ModuleSparsity",
    "RoseLoraCallback",
    "RoseLoraConfig",
    "RoseLoraLayer",
    "RoseLoraModel",
    "RoseLoraVariant",
    "ScheduleStateError",
    "SparsityReport",
    "UnsupportedSetupError",
    "check_transformers_adapter_api",
    "export_to_lora",
    "load_compact",
    "push_to_hub",
    "push_trainer_to_hub",
    "save_compact",
    "register_optimizer_hooks",
]
