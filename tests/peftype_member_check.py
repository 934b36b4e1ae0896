"""Run under any Python (3.10-3.13) without torch or peft installed: loads ``peft_roselora/_registration.py`` with a
stub ``peft.utils`` whose ``PeftType`` is a ``str`` enum like PEFT's, adds the member twice, and checks it behaves as
a real member. Prints "ok"."""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from pathlib import Path


class PeftType(str, enum.Enum):
    LORA = "LORA"
    ADALORA = "ADALORA"


peft = types.ModuleType("peft")
utils = types.ModuleType("peft.utils")
utils.PeftType = PeftType
utils.register_peft_method = lambda **kwargs: None
peft.utils = utils
sys.modules.update({"peft": peft, "peft.utils": utils})

path = Path(__file__).resolve().parents[1] / "peft_roselora" / "_registration.py"
spec = importlib.util.spec_from_file_location("registration", path)
registration = importlib.util.module_from_spec(spec)
spec.loader.exec_module(registration)

first = registration.add_peft_type_member()
second = registration.add_peft_type_member()  # idempotent
member = PeftType.ROSELORA
assert first is second is member is PeftType("ROSELORA") is PeftType["ROSELORA"]
assert member.value == "ROSELORA" and member.name == "ROSELORA" and member == "ROSELORA"
assert list(PeftType) == [PeftType.LORA, PeftType.ADALORA, member]
assert "ROSELORA" in PeftType.__members__ and isinstance(member, PeftType) and isinstance(member, str)
assert {member: 1}["ROSELORA"] == 1  # hashes like its string (PEFT's mappings are keyed by both)
print("ok", sys.version_info[:2])
