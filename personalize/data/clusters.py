"""In-context training data: a JSONL manifest of clusters of image-caption pairs that show one subject.

One record per line: ``{"cluster": ID, "file_name": PATH, "text": CAPTION}`` (``file_name`` relative
to the manifest), optionally ``"context": STR`` — what the image shows besides the subject (its scene,
accessory, color...) —, ``"class": NOUN`` (the subject's class noun) and ``"role"``: ``"example"`` (shown
as an example only, e.g. the original photos in an apprenticeship manifest), ``"target"`` (a target
only, e.g. an expert's generated image) or ``"both"`` (the default). A training sample is one target record plus K other members of its cluster as
the examples. SuTI's copy-paste trap: when the target looks like its examples the model learns to
copy; so examples are drawn from members whose ``context`` differs from the target's, and only where
a cluster has too few of those from the rest of the cluster (counted in ``stats``).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from personalize.data.datasets import Example, prepare_image
from personalize.data.images import DataError, load_image
from personalize.data.jsonl import parse_jsonl


@dataclass(frozen=True)
class ClusterRecord:
    cluster: str
    path: Path
    text: str
    context: Optional[str] = None
    subject_class: Optional[str] = None
    role: str = "both"  # example | target | both

ROLES = ("example", "target", "both")


def read_manifest(manifest: str | Path, what: str = "incontext.manifest") -> list[ClusterRecord]:
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"{what}: {manifest} does not exist")
    def parse(r: dict, _line: int) -> ClusterRecord:
        context, cls, role = r.get("context"), r.get("class"), str(r.get("role", "both"))
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        return ClusterRecord(str(r["cluster"]), manifest.parent / r["file_name"], str(r["text"]),
                             None if context is None else str(context), None if cls is None else str(cls), role)

    records, bad = parse_jsonl(manifest, parse)
    problems = [f"  line {number}: {problem} (need cluster, file_name, text)" for number, problem in bad]
    if problems:
        raise DataError(f"{what}: {manifest} has bad records:\n" + "\n".join(problems[:20]))
    if not records:
        raise DataError(f"{what}: {manifest} has no records")
    return records


def write_manifest(records: list[ClusterRecord], manifest: str | Path) -> Path:
    """Write records (paths made relative to the manifest's folder where possible), atomically."""
    import os

    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        try:
            name = r.path.resolve().relative_to(manifest.parent.resolve()).as_posix()
        except ValueError:
            name = str(r.path.resolve())
        record = {"cluster": r.cluster, "file_name": name, "text": r.text}
        if r.context is not None:
            record["context"] = r.context
        if r.subject_class is not None:
            record["class"] = r.subject_class
        if r.role != "both":
            record["role"] = r.role
        lines.append(json.dumps(record))
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest


class ClusterDataset(Dataset):
    """Items: a target record (pixels or cached latents, caption) with K examples of its cluster."""

    def __init__(self, records: list[ClusterRecord], num_references: int, resolution: int,
                 caption_dropout: float = 0.0, random_flip: bool = False):
        self.resolution, self.center_crop, self.random_flip = resolution, True, random_flip
        self.num_references, self.caption_dropout = num_references, caption_dropout
        members, examples = defaultdict(list), defaultdict(list)
        for i, r in enumerate(records):
            members[r.cluster].append(i)
            if r.role != "target":
                examples[r.cluster].append(i)
        def enough(i: int) -> bool:  # the target has K examples besides itself
            return len(examples[records[i].cluster]) - (records[i].role == "both") >= num_references

        self.records = records
        self.targets = [i for i, r in enumerate(records) if r.role != "example" and enough(i)]
        kept = {records[i].cluster for i in self.targets}
        small = sorted(set(members) - kept)
        self.members = {c: examples[c] for c in kept}  # who can be shown as an example
        if not self.targets:
            raise DataError(f"incontext: no cluster has a target and incontext.num_references={num_references} "
                            f"other members to show as examples; clusters: {len(members)}")
        self.stats = {"clusters": len(self.members), "targets": len(self.targets),
                      "clusters_too_small": len(small)}
        self.examples = [Example(r.path, r.text) for r in records]  # for the latent and text caches
        self.latent_cache: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.targets)

    def examples_for(self, target: int, rng: random.Random) -> list[int]:
        """K other members of the target's cluster, from those in another context where there are enough."""
        record = self.records[target]
        others = [i for i in self.members[record.cluster] if i != target and self.records[i].path != record.path]
        different = [i for i in others if record.context is None or self.records[i].context != record.context]
        pool = different if len(different) >= self.num_references else others
        return rng.sample(pool, self.num_references)

    def _image(self, index: int, rng: random.Random) -> dict:
        path = self.records[index].path
        if self.latent_cache is not None:
            return {"latent_mean": self.latent_cache[path][0], "latent_std": self.latent_cache[path][1]}
        pixels, _, _ = prepare_image(load_image(path), self.resolution, True, self.random_flip, rng)
        return {"pixel_values": pixels}

    def __getitem__(self, key) -> dict:
        position, sample_seed = key if isinstance(key, tuple) else (key, 0)
        target = self.targets[position]
        rng = random.Random(sample_seed)
        refs = self.examples_for(target, rng)
        record = self.records[target]
        item = {"sample_seed": sample_seed, "original_size": (self.resolution, self.resolution),
                "crop_top_left": (0, 0), **self._image(target, rng),
                "prompt": "" if self.caption_dropout and rng.random() < self.caption_dropout else record.text,
                "reference_prompts": [self.records[i].text for i in refs]}
        ref_items = [self._image(i, rng) for i in refs]
        for key_ in ref_items[0]:
            item[f"reference_{key_}"] = torch.stack([r[key_] for r in ref_items])
        return item

    def attach_latent_cache(self, cache: dict, sizes: dict) -> None:
        self.latent_cache = cache
