"""Sampling: render prompts with a base model plus an optional LoRA, Textual Inversion embedding or
DreamBooth output, and lay images out in grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    cols = max(1, -(-len(images) // max(rows, 1)))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: list[Image.Image], out: str | Path) -> Path:
    """``out/000.png ...`` and ``out/grid.png`` (one row); prints what it wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:03d}.png")
    image_grid(images, rows=1).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return out


@torch.no_grad()
def render(models, prompts: list[str], num_images_per_prompt: int, steps: int, guidance_scale: float, seed: int,
           resolution: int, negative_prompt: Optional[str] = None, device=None, pipeline=None) -> list[Image.Image]:
    """Images for each prompt, in prompt order; image j of prompt i uses seed ``seed + j``."""
    pipe = pipeline or models.pipeline()
    if device is not None:
        pipe = pipe.to(device)
    images = []
    for prompt in prompts:
        for j in range(num_images_per_prompt):
            generator = torch.Generator().manual_seed(seed + j)
            images += pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=resolution, width=resolution,
                           generator=generator).images
    return images


def build_pipeline(base: str, lora: Optional[str] = None, embeddings: Optional[str] = None,
                   token: Optional[str] = None, allow_pickle: bool = False):
    """A stock diffusers pipeline: ``base`` (a model or a DreamBooth output folder) + LoRA / embeddings."""
    from personalize.config import ModelConfig
    from personalize.models import load_models

    models = load_models(ModelConfig(base=base, allow_pickle=allow_pickle))
    pipe = models.pipeline()
    if lora:
        pipe.load_lora_weights(lora)
    if embeddings:
        path = Path(embeddings)
        if path.is_dir():
            path = path / "learned_embeds.safetensors"
        pipe.load_textual_inversion(str(path), token=token)
    return pipe
