"""Training datasets: a subject folder (with optional captions), a captioned JSONL, class images.

Items are requested as ``(index, sample_seed)`` by :class:`StepBatchSampler`; every random choice
for a sample (crop, flip, caption dropout, later its noise and timestep) comes from its seed, so a
resumed or multi-process run sees exactly what an uninterrupted single-process run sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from personalize.data.jsonl import parse_jsonl
from personalize.data.images import DataError, check_images, list_images, load_image


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str


def folder_examples(folder: str | Path, prompt: str | None, caption_extension: str, what: str) -> list[Example]:
    """Images of ``folder`` with the caption file beside each (NAME.txt), else ``prompt``."""
    examples = []
    for path in list_images(folder, what):
        caption_file = path.with_suffix(caption_extension)
        if caption_file.is_file():
            examples.append(Example(path, caption_file.read_text(encoding="utf-8").strip()))
        elif prompt:
            examples.append(Example(path, prompt))
        else:
            raise DataError(f"{what}: {path.name} has no caption file {caption_file.name} and no prompt is set")
    return examples


def jsonl_examples(metadata: str | Path) -> list[Example]:
    """Records ``{"file_name": ..., "text": ...}``, one per line; file_name relative to the JSONL."""
    metadata = Path(metadata)
    if not metadata.is_file():
        raise DataError(f"data.metadata: {metadata} does not exist")
    examples, bad = parse_jsonl(metadata, lambda r, _: Example(metadata.parent / r["file_name"], str(r["text"])))
    problems = [f"  line {number}: {what} (need file_name and text)" for number, what in bad]
    if problems:
        raise DataError(f"data.metadata: {metadata} has bad records:\n" + "\n".join(problems))
    if not examples:
        raise DataError(f"data.metadata: {metadata} has no records")
    return examples


def validated(examples: list[Example], min_size: int, skip_bad: bool, what: str) -> list[Example]:
    good = set(check_images([e.path for e in examples], min_size=min_size, skip_bad=skip_bad, what=what))
    return [e for e in examples if e.path in good]


def instance_examples(data) -> list[Example]:
    """The training examples described by a :class:`DataConfig`."""
    if data.metadata and data.toyworld_images:
        from personalize.toyworld.dataset import render_dataset
        render_dataset(data.metadata, data.toyworld_images, data.toyworld_seed)
    if data.metadata:
        examples, what = jsonl_examples(data.metadata), "data.metadata"
    elif data.instance_images:
        examples = folder_examples(data.instance_images, data.instance_prompt, data.caption_extension,
                                   "data.instance_images")
        what = "data.instance_images"
    else:
        raise DataError("data: set data.instance_images (a folder) or data.metadata (a JSONL)")
    min_size = data.min_image_size or data.resolution // 2
    return validated(examples, min_size, data.skip_bad_images, what) * data.repeats


def prepare_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize the short side to ``resolution``, crop a square, maybe flip; pixels in [-1, 1]."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != (image.width, image.height):
        image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    else:
        top, left = rng.randint(0, image.height - resolution), rng.randint(0, image.width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, original_size, (top, left)


class ImageDataset(Dataset):
    """Image + caption items; ``latent_cache`` (set by the trainer) replaces pixels by VAE latents."""

    def __init__(self, examples: list[Example], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, caption_dropout: float = 0.0):
        self.examples = examples
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.caption_dropout = caption_dropout
        self.latent_cache: dict[Path, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key) -> dict:
        index, sample_seed = key if isinstance(key, tuple) else (key, 0)
        example = self.examples[index]
        rng = random.Random(sample_seed)
        item = {"sample_seed": sample_seed}
        if self.latent_cache is not None:
            item["latent_mean"], item["latent_std"] = self.latent_cache[example.path]
            item["original_size"], item["crop_top_left"] = self._sizes[example.path]
        else:
            item["pixel_values"], item["original_size"], item["crop_top_left"] = prepare_image(
                load_image(example.path), self.resolution, self.center_crop, self.random_flip, rng)
        item["prompt"] = "" if self.caption_dropout and rng.random() < self.caption_dropout else example.prompt
        return item

    def attach_latent_cache(self, cache: dict, sizes: dict) -> None:
        self.latent_cache, self._sizes = cache, sizes


class PriorPairDataset(Dataset):
    """DreamBooth pairs: instance item i with class item i (each cycling through its own list)."""

    def __init__(self, instance: ImageDataset, class_: ImageDataset):
        self.instance, self.class_ = instance, class_

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_))

    def __getitem__(self, key) -> dict:
        index, seed = key
        return {"instance": self.instance[(index % len(self.instance), seed)],
                "class": self.class_[(index % len(self.class_), seed + 7919)]}


def collate(items: list[dict]) -> dict:
    """Stack items; prior pairs become [instance..., class...] with ``num_instance`` recorded."""
    if "instance" in items[0]:
        flat = [it["instance"] for it in items] + [it["class"] for it in items]
    else:
        flat = items
    batch = {
        "prompts": [it["prompt"] for it in flat],
        "sample_seeds": [it["sample_seed"] for it in flat],
        "original_size": torch.tensor([it["original_size"] for it in flat]),
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in flat]),
        "num_instance": len(items),
    }
    for key in ("pixel_values", "latent_mean", "latent_std",  # in-context samples: (batch, K, ...) examples
                "reference_pixel_values", "reference_latent_mean", "reference_latent_std"):
        if key in flat[0]:
            batch[key] = torch.stack([it[key] for it in flat])
    if "reference_prompts" in flat[0]:
        batch["reference_prompts"] = [p for it in flat for p in it["reference_prompts"]]
    return batch


class StepBatchSampler:
    """Infinite batches for one process, laid out so that the global batch of a step does not depend
    on the number of processes: step s covers global positions [s*B, (s+1)*B) with B = batch x world,
    process r takes its slice. Each epoch is a seeded permutation; each position gets its own seed."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self._perms: dict[int, list[int]] = {}

    def _item(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_items)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_items, generator=g).tolist()}
        return self._perms[epoch][offset], self.seed * 1_000_000_007 + position

    def __iter__(self):
        step = self.start_batch
        global_batch = self.batch_size * self.world_size
        while True:
            first = step * global_batch + self.rank * self.batch_size
            yield [self._item(p) for p in range(first, first + self.batch_size)]
            step += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is unbounded
        return 2**62
