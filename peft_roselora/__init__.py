"""RoseLoRA (row and column-wise sparse low-rank adaptation) as a native PEFT method.

``import peft_roselora`` registers ``RoseLoraConfig`` / ``RoseLoraModel`` with PEFT, after which
``get_peft_model(model, RoseLoraConfig(...))``, ``PeftModel.from_pretrained`` and the rest of PEFT accept RoseLoRA
adapters. Loading a RoseLoRA adapter in a process that has not imported ``peft_roselora`` fails inside PEFT with
``KeyError: 'ROSELORA'``; use :func:`export_to_lora` to produce an adapter that stock PEFT loads.
"""

from ._registration import add_peft_type_member


add_peft_type_member()

from ._registration import register  # noqa: E402
from .callback import RoseLoraCallback, UnsupportedSetupError  # noqa: E402
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
