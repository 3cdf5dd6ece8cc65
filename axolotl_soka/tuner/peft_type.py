"""The ``PeftType.SOKA`` enum member that PEFT needs before an out-of-tree method can register.

peft 0.20 saves adapters only for members of ``PeftType`` (``get_peft_model_state_dict`` raises "Unknown PEFT
type" otherwise) and ``register_peft_method`` requires ``name.upper()`` to be a member in both 0.20 and 0.21, so
we add the member to the ``str``-valued enum at import time.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _ensure_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


SOKA_PEFT_TYPE = _ensure_member("SOKA")
