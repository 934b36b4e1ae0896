"""Register RoseLoRA with PEFT: a real ``PeftType.ROSELORA`` member and the tuner mappings.

PEFT's ``register_peft_method`` only accepts names that are already members of the closed ``PeftType`` enum, so the
member is added here at import time. Both steps are idempotent.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


PEFT_TYPE_NAME = "ROSELORA"


def add_peft_type_member(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Add ``name`` as a member of ``peft.utils.PeftType`` (a ``str`` enum) unless it is one already.

    The member is a real enum member: ``PeftType(name)``, ``PeftType[name]``, ``PeftType.<name>``, iteration,
    ``.value`` and ``.name`` all work (Python 3.10-3.13).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    # without this, PeftType.<name> raises AttributeError on Python 3.12+ (members are looked up as class attributes)
    type.__setattr__(PeftType, name, member)
    return member


def register() -> None:
    """Make RoseLoRA a PEFT method: ``get_peft_model``, ``PeftModel.from_pretrained`` and friends then accept it;
    and give RoseLoRA models a correct model card in ``save_pretrained`` / ``push_to_hub`` (see ``hub.py``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import RoseLoraConfig
    from .hub import install_peft_model_hooks
    from .model import RoseLoraModel

    install_peft_model_hooks()
    peft_type = add_peft_type_member()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=RoseLoraConfig, model_cls=RoseLoraModel, prefix=RoseLoraModel.prefix
    )
