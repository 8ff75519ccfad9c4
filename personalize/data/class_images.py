"""Class (prior-preservation) images: reuse what the folder holds, generate only what is missing.

Images are generated with the base model before any training, saved atomically (temp file, then
rename), so a stopped generation resumes where it stopped and a second run generates none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personalize.data.images import IMAGE_EXTENSIONS
from personalize.utils.files import save_image


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def ensure_class_images(prior, models, resolution: int, seed: int, device, progress: bool = True) -> int:
    """Generate ``prior.num_class_images - len(existing)`` images of ``prior.class_prompt``.

    Returns how many were generated (0 when the folder already holds enough)."""
    folder = Path(prior.class_images)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(existing_class_images(folder))
    missing = prior.num_class_images - have
    if missing <= 0:
        return 0
    pipe = models.pipeline().to(device)
    tag = hashlib.sha1(prior.class_prompt.encode()).hexdigest()[:8]
    made = 0
    with tqdm(total=missing, desc="class images", disable=not progress) as bar:
        while made < missing:
            n = min(prior.generation_batch_size, missing - made)
            generator = torch.Generator().manual_seed(seed + have + made)
            images = pipe([prior.class_prompt] * n, num_inference_steps=prior.generation_steps,
                          guidance_scale=prior.guidance_scale, height=resolution, width=resolution,
                          generator=generator).images
            for image in images:
                save_image(image, folder / f"class-{tag}-{have + made:05d}.png")
                made += 1
                bar.update(1)
    del pipe
    return made
