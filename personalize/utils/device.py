"""The ``--device`` option of the commands: a torch device that exists on this machine."""

from __future__ import annotations

from typing import Optional

from personalize.errors import ConfigError


def resolve_device(name: Optional[str], option: str = "--device") -> str:
    """``name`` checked against this machine (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{option}: {name!r} is not a device ({err}); e.g. cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}: {name}: CUDA is not available on this machine; use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option}: {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}: {name}: MPS is not available on this machine; use {option} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{option}: {name}: not supported here; use cpu or cuda")
    return name
