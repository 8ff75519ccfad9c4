"""Training methods, registered by name.

A method is a small class (see :class:`personalize.methods.base.Method`) registered with
:func:`register_method`; the trainer looks it up by the recipe's ``method:`` key. There is no
second list to edit: importing a method's module registers it.
"""

from __future__ import annotations

import difflib

_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name`` (checked, no duplicates)."""
    from dataclasses import is_dataclass

    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    if not is_dataclass(getattr(cls, "config_cls", None)):
        raise ValueError(f"{cls.__name__}.config_cls must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type:
    _load_builtin_methods()
    if name not in _REGISTRY:
        match = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise KeyError(f"unknown method {name!r}{hint} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def _load_builtin_methods() -> None:
    from personalize.methods import (  # noqa: F401
        autoencoder, dreambooth, incontext, lora, text2image, textual_inversion,
    )
