"""Register SNELL and SNELLA with Hugging Face PEFT (the one place that touches PEFT's internals).

PEFT's ``register_peft_method`` only accepts names already in its closed ``PeftType`` enum. An
upstream pull request would add two lines to ``peft.utils.peft_types.PeftType``::

    SNELL = "SNELL"
    SNELLA = "SNELLA"

and call, in ``peft/tuners/snell/__init__.py``, exactly what :func:`register` calls. Until then
:func:`ensure_peft_types` adds the two members to the installed enum at import time (the same
member objects a class body would create: ``PeftType("SNELLA")``, ``PeftType.SNELLA`` and
``"SNELLA" in list(PeftType)`` all work). Tested against the pinned peft (pyproject.toml).

SNELLA shares SNELL's layer and parameter names, hence its prefix ``"snell_"`` (as AdaLoRA
shares LoRA's ``"lora_"``).
"""

from __future__ import annotations

from peft.utils import PeftType

NAMES = ("snell", "snella")
PREFIX = "snell_"


def _add_member(enum_cls: type, name: str) -> None:
    if name in enum_cls.__members__:
        return
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    type.__setattr__(enum_cls, name, member)  # class attribute first (EnumType blocks members)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)


def ensure_peft_types() -> None:
    """Make ``PeftType.SNELL`` and ``PeftType.SNELLA`` exist (no-op once PEFT ships them)."""
    for name in NAMES:
        _add_member(PeftType, name.upper())


def register(config_classes: dict[str, type], model_classes: dict[str, type]) -> None:
    """``peft.utils.register_peft_method`` for each method not yet registered (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    ensure_peft_types()
    for name in NAMES:
        if PeftType[name.upper()] in PEFT_TYPE_TO_TUNER_MAPPING:
            continue
        register_peft_method(name=name, config_cls=config_classes[name],
                             model_cls=model_classes[name], prefix=PREFIX)


ensure_peft_types()
