"""What the harness writes and compares: its JSON records (atomic), what a result was made with
(:func:`as_json`, :func:`changes`, :func:`file_digests`), slugs, and peak memory of a step."""

from __future__ import annotations

import hashlib
import json
import re
import resource
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from personalize.utils.files import atomic_write_json
from personalize.utils.trees import flatten


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def read_json(path: Path) -> Optional[dict]:
    """A JSON object this harness wrote earlier, or None when ``path`` is missing or unreadable (then the
    harness makes it again)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def changes(old: Optional[dict], new: dict) -> list[str]:
    """What differs between two ``made_with`` records, as ``key: old -> new`` (short)."""
    if old is None:
        return ["not recorded (made by an earlier version)"]
    a, b = flatten(old), flatten(new)

    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}: {short(a.get(k))} -> {short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def file_digests(paths: Sequence[Path]) -> list[str]:
    """``name:sha256[:16]`` of each file: what the numbers of a subject depend on in its photos."""
    return [f"{Path(p).name}:{hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]}" for p in paths]


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so records compare equal after a rerun."""
    return json.loads(json.dumps(value))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


class PeakMemory:
    """Peak memory of the block: CUDA's max allocated when on a GPU, else the process's max RSS (which
    cannot be reset, so on a CPU it is the peak of the process so far)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda max allocated" if self.cuda else "process max RSS"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
