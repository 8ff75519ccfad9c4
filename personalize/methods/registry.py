"""The method registry, a leaf: each method module registers its class here with :func:`register_method`;
:mod:`personalize.methods` looks them up (peft's ``mapping.py`` pattern: no config ever imports a method)."""

from __future__ import annotations

from personalize.utils.registry import checked_name

REGISTRY: dict[str, type] = {}  # method name -> Method class
OPTIONS: dict[str, type] = {}  # method name -> its options dataclass (personalize.methods.options)


def register_options(cls: type) -> type:
    """Class decorator of a method's options dataclass: register it under ``cls.method`` (no duplicates)."""
    OPTIONS[checked_name(OPTIONS, cls, "method", "an options class for a method")] = cls
    return cls


def register_method(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name`` (checked, no duplicates)."""
    from dataclasses import is_dataclass

    name = checked_name(REGISTRY, cls, "name", "a method")
    if not is_dataclass(getattr(cls, "config_cls", None)):
        raise ValueError(f"{cls.__name__}.config_cls must be a dataclass")
    if OPTIONS.get(name, cls.config_cls) is not cls.config_cls:
        raise ValueError(f"{cls.__name__}.config_cls is not the options registered for {name!r}")
    REGISTRY[name] = cls
    return cls
