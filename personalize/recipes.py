"""Recipes: where a YAML recipe becomes a validated :class:`~personalize.config.Config`.

:func:`resolve_recipe` finds a recipe by path or by its shipped name (``tiny/lora``); :func:`load_config`
reads it, applies ``section.key=value`` overrides and builds every section, the method's own section
through the method registry. :mod:`personalize.config` holds the schema only and knows no method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from personalize.config import (
    SECTIONS, Config, ConfigError, apply_overrides, build_section, check_memory, closest_key, read_recipe,
)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe(name: str) -> Path:
    """A path, or a shipped recipe name such as ``tiny/lora`` or ``dreambooth-sd15``."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports that it does not exist


def shipped_recipes() -> list[Path]:
    return sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "accelerate" not in p.parts)


def load_config(recipe: str | Path | dict, overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (file path or dict), apply ``key=value`` overrides, validate everything. Only the
    methods' options (:mod:`personalize.methods.options`) are imported, not the methods: a bad recipe is
    refused without loading torch."""
    from personalize.methods import options  # noqa: F401  (importing it registers every method's options)
    from personalize.methods.registry import OPTIONS

    source = None if isinstance(recipe, dict) else str(recipe)
    raw = dict(recipe) if isinstance(recipe, dict) else read_recipe(recipe)
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return _from_dict(raw, source, OPTIONS)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None


def _from_dict(raw: dict, source: Optional[str], options: dict[str, type]) -> Config:
    known_methods = sorted(options)
    method = raw.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"'method' is required; one of {', '.join(known_methods)}")
    if method not in known_methods:
        raise ConfigError(f"method: unknown method {method!r}{closest_key(method, known_methods)}")
    valid_roots = ["method", *SECTIONS, method]
    for key in raw:
        if key in known_methods and key != method:
            raise ConfigError(f"section '{key}' configures method '{key}', but method is '{method}'")
        if key not in valid_roots:
            raise ConfigError(f"unknown section '{key}'{closest_key(str(key), valid_roots)}")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    method_config = build_section(options[method], raw.get(method), method)
    config = Config(method=method, method_config=method_config, source=source, **sections)
    options[method].validate(config)
    check_memory(config)
    return config
