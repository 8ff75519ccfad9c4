"""The check every name registry of the project makes (methods, their options, zero-shot rows): a class
registers under an identifier, and a name is never taken twice."""

from __future__ import annotations


def checked_name(registry: dict[str, type], cls: type, attribute: str, kind: str) -> str:
    """``cls``'s name (its ``attribute``), checked: an identifier, not registered under another class."""
    name = getattr(cls, attribute, None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.{attribute} must be an identifier, got {name!r}")
    if name in registry and registry[name] is not cls:
        raise ValueError(f"{kind} named {name!r} is already registered ({registry[name].__qualname__})")
    return name
