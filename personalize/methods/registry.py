"""The method registry, a leaf: each method module registers its class here with :func:`register_method`;
:mod:`personalize.methods` looks them up (peft's ``mapping.py`` pattern: no config ever imports a method)."""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name`` (checked, no duplicates)."""
    from dataclasses import is_dataclass

    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier, got {name!r}")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({REGISTRY[name].__qualname__})")
    if not is_dataclass(getattr(cls, "config_cls", None)):
        raise ValueError(f"{cls.__name__}.config_cls must be a dataclass")
    REGISTRY[name] = cls
    return cls
