"""Rendered toy-world training sets: a folder of PNGs with a ``metadata.jsonl`` of captions, the
format every method reads through ``data.metadata``. Written atomically, so an interrupted render
never leaves a half set that a later run would take for complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from personalize.toyworld.world import caption, render, sample_spec, training_subject

SUBJECT_POOL = 1_000_000  # training subjects drawn from the unlimited supply


def sample_training_specs(n: int, seed: int, p_subject: float = 0.5) -> list:
    """``n`` image specs: generic objects and (with probability ``p_subject``) training subjects."""
    rng = np.random.default_rng([3, seed])
    specs = []
    for _ in range(n):
        subject = training_subject(int(rng.integers(SUBJECT_POOL))) if rng.random() < p_subject else None
        specs.append(sample_spec(rng, subject))
    return specs


@contextmanager
def atomic_folder(folder: Path, prefix: str = ".render-") -> Iterator[Path]:
    """A temporary folder beside ``folder`` that replaces it when the block ends without an error (an
    existing ``folder``, which lacks the finished file, is set aside as ``folder.incomplete``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        yield tmp
        if folder.exists():  # left by someone else: keep it aside
            shutil.rmtree(folder) if not any(folder.iterdir()) else os.replace(folder, f"{folder}.incomplete")
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_dataset(metadata: str | Path, n: int, seed: int = 0, progress: bool = True) -> Path:
    """Render ``n`` captioned images next to ``metadata`` (a JSONL path) unless it already exists."""
    metadata = Path(metadata)
    if metadata.is_file():
        return metadata
    with atomic_folder(metadata.parent) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for i, spec in enumerate(tqdm(sample_training_specs(n, seed), desc="rendering toy world", disable=not progress)):
            name = f"images/{i:06d}.png"
            Image.fromarray(render(spec)).save(tmp / name, compress_level=1)
            lines.append(json.dumps({"file_name": name, "text": caption(spec)}))
        (tmp / metadata.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metadata
