"""Caching of VAE latents and text embeddings when those encoders are frozen.

Latents are stored as the posterior's mean and std, and sampled per step from the sample's own seed,
so a cached run draws the same latents as an uncached one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from personalize.data.datasets import ImageDataset, prepare_image
from personalize.data.images import load_image


def _fingerprint(vae, resolution: int, paths: list[Path]) -> str:
    """Changes when the VAE weights, the resolution or any image file changes."""
    digest = hashlib.sha256(f"{resolution}".encode())
    for tensor in vae.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _load_cache_file(cache_file: Path, fingerprint: str, paths: list[Path]):
    try:
        with safe_open(str(cache_file), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            mean, std, sizes = f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("sizes")
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if len(mean) != len(paths):
        return None
    latents = {p: (mean[i], std[i]) for i, p in enumerate(paths)}
    shapes = {p: ((int(s[0]), int(s[1])), (int(s[2]), int(s[3]))) for p, s in zip(paths, sizes.tolist())}
    return latents, shapes


@torch.no_grad()
def cache_latents(dataset: ImageDataset, models, device, progress: bool = True, batch_size: int = 32,
                  cache_file: Optional[Path] = None, write: bool = True) -> None:
    """Encode every distinct image of ``dataset`` once (in batches) and attach the result to it.

    With ``cache_file`` the latents are also kept on disk (safetensors, written atomically) and reused
    by a later or resumed run whose VAE, resolution and image files are unchanged."""
    paths = sorted({e.path for e in dataset.examples})
    fingerprint = _fingerprint(models.vae, dataset.resolution, paths) if cache_file else ""
    if cache_file is not None and cache_file.is_file():
        loaded = _load_cache_file(cache_file, fingerprint, paths)
        if loaded is not None:
            dataset.attach_latent_cache(*loaded)
            return
    latents, sizes = {}, {}
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
    if cache_file is not None and write:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".tmp")
        save_file({"mean": torch.stack([latents[p][0] for p in paths]),
                   "std": torch.stack([latents[p][1] for p in paths]),
                   "sizes": torch.tensor([[*sizes[p][0], *sizes[p][1]] for p in paths])},
                  str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, cache_file)


class TextCache:
    """Prompt -> encoded text conditioning, filled lazily or up front for known prompts."""

    def __init__(self, models):
        self.models = models
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def fill(self, prompts, batch_size: int = 64) -> None:
        """Encode the prompts not cached yet, ``batch_size`` at a time (prompts are padded to the
        tokenizer's full length, so a prompt's encoding does not depend on the others in its batch)."""
        todo = sorted(set(prompts) - set(self.entries))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            encoded = self.models.encode_text(self.models.tokenize(chunk))
            for i, prompt in enumerate(chunk):
                self.entries[prompt] = {k: v[i].float().cpu().clone() for k, v in encoded.items()}

    def __call__(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        self.fill(prompts)
        keys = self.entries[prompts[0]].keys()
        return {k: torch.stack([self.entries[p][k] for p in prompts]).to(device) for k in keys}
