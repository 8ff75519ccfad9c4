"""Nested dicts (configs, settings records) as flat ``{"a.b.c": leaf}`` dicts; lists are leaves."""

from __future__ import annotations

from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}`` (lists are leaves; a non-dict ``value`` is ``{prefix: value}``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out
