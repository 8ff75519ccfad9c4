"""Toy-world in-context training data: clusters of renders of one training subject each, in varied
contexts (scene, accessory, recoloring, size), captioned in DreamBench phrasing without naming the
subject, with the context recorded so that targets and their examples differ in it.

Held-out subjects (``heldout_subjects``) are never rendered here: training subjects come from the
unlimited supply, which is disjoint from them (tested in tests/test_toyworld.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from personalize.data.clusters import ClusterRecord, write_manifest
from personalize.toyworld.dataset import atomic_folder
from personalize.toyworld.world import COLORS, ImageSpec, caption, render, sample_spec, training_subject

FIRST_SUBJECT = 2_000_000  # cluster subjects come from a range of the supply the base model's set does not draw


def context(spec: ImageSpec) -> str:
    return f"{spec.scene or 'plain'}/{spec.accessory or '-'}/{spec.color}/{spec.size}"


def cluster_specs(n_subjects: int, per_subject: int, seed: int = 0, p_recolor: float = 0.2) -> list[tuple[str, ImageSpec]]:
    """``per_subject`` renders of each of ``n_subjects`` training subjects, in distinct contexts."""
    rng = np.random.default_rng([8, seed])
    out = []
    for i in range(n_subjects):
        subject = training_subject(FIRST_SUBJECT + seed * 1_000_003 + i)
        seen: set[str] = set()
        for _ in range(per_subject * 20):
            if len(seen) == per_subject:
                break
            color = str(rng.choice(list(COLORS))) if rng.random() < p_recolor else None
            spec = sample_spec(rng, subject, color=color, p_no_scene=0.05)
            if context(spec) not in seen:
                seen.add(context(spec))
                out.append((f"subject-{i:06d}", spec))
    return out


def render_clusters(manifest: str | Path, n_subjects: int, per_subject: int = 6, seed: int = 0,
                    progress: bool = True) -> Path:
    """Render the clusters and their manifest next to ``manifest`` unless it exists (atomically)."""
    manifest = Path(manifest)
    if manifest.is_file():
        return manifest
    with atomic_folder(manifest.parent, ".clusters-") as tmp:
        (tmp / "images").mkdir()
        records = []
        specs = cluster_specs(n_subjects, per_subject, seed)
        for i, (cluster, spec) in enumerate(tqdm(specs, desc="rendering toy clusters", disable=not progress)):
            path = tmp / "images" / f"{i:07d}.png"
            Image.fromarray(render(spec)).save(path, compress_level=1)
            records.append(ClusterRecord(cluster, path, caption(spec), context(spec), spec.cls))
        write_manifest(records, tmp / manifest.name)
    return manifest
