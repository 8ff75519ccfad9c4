"""The method registry, a leaf: each method module registers its class here with :func:`register_method`;
:mod:`personalize.methods` looks them up (peft's ``mapping.py`` pattern: no config ever imports a method)."""

from __future__ import annotations

REGISTRY: dict[str, type] = {}  # method name -> Method class
OPTIONS: dict[str, type] = {}  # method name -> its options dataclass (personalize.methods.options)


def register_options(cls: type) -> type:
    """Class decorator of a method's options dataclass: register it under ``cls.method`` (no duplicates)."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.method must be an identifier, got {name!r}")
    if name in OPTIONS and OPTIONS[name] is not cls:
        raise ValueError(f"options for method {name!r} are already registered ({OPTIONS[name].__qualname__})")
    OPTIONS[name] = cls
    return cls


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
    if OPTIONS.get(name, cls.config_cls) is not cls.config_cls:
        raise ValueError(f"{cls.__name__}.config_cls is not the options registered for {name!r}")
    REGISTRY[name] = cls
    return cls
