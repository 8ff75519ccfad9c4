"""Training methods, registered by name.

A method is a small class (see :class:`personalize.methods.base.Method`) registered with
:func:`register_method`; the trainer looks it up by the recipe's ``method:`` key. There is no
second list to edit: importing a method's module registers it.
"""

from __future__ import annotations

import difflib

from personalize.methods.registry import REGISTRY, register_method

__all__ = ["get_method_class", "method_names", "register_method"]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(REGISTRY)


def get_method_class(name: str) -> type:
    _load_builtin_methods()
    if name not in REGISTRY:
        match = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise KeyError(f"unknown method {name!r}{hint} (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def _load_builtin_methods() -> None:
    from personalize.methods import (  # noqa: F401  (importing a method's module registers it)
        autoencoder, dreambooth, incontext, lora, text2image, textual_inversion,
    )
