"""Caching of VAE latents and text embeddings when those encoders are frozen.

Latents are stored as the posterior's mean and std, and sampled per step from the sample's own seed,
so a cached run draws the same latents as an uncached one.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from personalize.data.datasets import ImageDataset, prepare_image
from personalize.data.images import load_image


@torch.no_grad()
def cache_latents(dataset: ImageDataset, models, device, progress: bool = True, batch_size: int = 32) -> None:
    """Encode every distinct image of ``dataset`` once (in batches) and attach the result to it."""
    latents, sizes = {}, {}
    paths = sorted({e.path for e in dataset.examples})
    with tqdm(total=len(paths), desc="caching latents", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start: start + batch_size]
            prepared = [prepare_image(load_image(p), dataset.resolution, True, False, None) for p in chunk]
            mean, std = models.encode_images(torch.stack([pixels for pixels, _, _ in prepared]).to(device))
            for i, (path, (_, original_size, crop)) in enumerate(zip(chunk, prepared)):
                latents[path] = (mean[i].float().cpu().clone(), std[i].float().cpu().clone())
                sizes[path] = (original_size, crop)
            bar.update(len(chunk))
    dataset.attach_latent_cache(latents, sizes)


class TextCache:
    """Prompt -> encoded text conditioning, filled lazily or up front for known prompts."""

    def __init__(self, models):
        self.models = models
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def fill(self, prompts) -> None:
        for prompt in sorted(set(prompts) - set(self.entries)):
            encoded = self.models.encode_text(self.models.tokenize([prompt]))
            self.entries[prompt] = {k: v[0].float().cpu() for k, v in encoded.items()}

    def __call__(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        self.fill(prompts)
        keys = self.entries[prompts[0]].keys()
        return {k: torch.stack([self.entries[p][k] for p in prompts]).to(device) for k in keys}
