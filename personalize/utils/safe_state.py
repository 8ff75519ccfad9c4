"""State trees (optimizer, LR schedule, EMA, RNG, grad scaler) stored without pickle.

A tree of dicts, lists, tuples, numbers, strings, booleans, None, tensors and numpy arrays is split
into its tensors, written with safetensors, and its structure, written as JSON in which each tensor is
``{"__tensor__": "name"}``. Tuples, numpy arrays and dicts with non-string keys (an optimizer's
``state`` is keyed by parameter index) are tagged so the tree reads back exactly as it was written.
Reading uses only ``json`` and ``safetensors``: nothing in a checkpoint can run code when loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personalize.errors import CheckpointError


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = path or "value"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        name = path or "value"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {"__ndarray__": name}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, path)
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"state key {k!r} at {path or '/'} is not a string or a number")
            items.append([k, _encode(v, tensors, f"{path}/{k}")])
        return {"__dict__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state value of type {type(value).__name__} at {path or '/'} cannot be stored without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag in ("__tensor__", "__ndarray__"):
            if not isinstance(inner, str) or inner not in tensors:
                raise CheckpointError(f"{source}: refers to tensor {inner!r}, which its .safetensors file lacks")
            return tensors[inner] if tag == "__tensor__" else tensors[inner].numpy()
        if tag == "__tuple__" and isinstance(inner, list):
            return tuple(_decode(v, tensors, source) for v in inner)
        if tag == "__dict__" and isinstance(inner, list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in inner):
                raise CheckpointError(f"{source}: a malformed mapping")
            return {k: _decode(v, tensors, source) for k, v in inner}
        if tag == "__float__" and inner in ("nan", "inf", "-inf"):
            return float(inner)
    return {k: _decode(v, tensors, source) for k, v in value.items()}


def save_tree(tree: Any, stem: str | Path) -> list[Path]:
    """Write ``stem.json`` (structure) and ``stem.safetensors`` (tensors); return both paths."""
    from safetensors.torch import save_file

    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, "")
    tensor_file, json_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    # safetensors refuses tensors that share memory; each entry gets its own storage
    save_file({k: v.clone() for k, v in tensors.items()}, str(tensor_file))
    json_file.write_text(json.dumps(structure))
    return [json_file, tensor_file]


def load_tree(stem: str | Path) -> Any:
    """Read what :func:`save_tree` wrote; a missing, truncated or malformed file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    tensor_file, json_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (json_file, tensor_file):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
    try:
        structure = json.loads(json_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{json_file} is damaged (not valid JSON: {err})") from None
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{tensor_file} is damaged or truncated ({err})") from None
    return _decode(structure, tensors, json_file)
