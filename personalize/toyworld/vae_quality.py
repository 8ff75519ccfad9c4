"""How well a VAE reconstructs toy-world renders it has never seen: PSNR over held-out seeds and
subjects, overall and by scene (the toy model card, ``eval/toy_model.py``)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def psnr_specs(n: int = 256, seed: int = 12345) -> list:
    """The render specs :func:`vae_psnr` measures: held-out seeds, every second one a held-out subject."""
    import numpy as np

    from personalize.toyworld.world import heldout_subjects, sample_spec

    rng = np.random.default_rng([6, seed])
    subjects = heldout_subjects()
    return [sample_spec(rng, subjects[i % len(subjects)] if i % 2 else None) for i in range(n)]


def psnr_by_scene(psnr, n: int = 256, seed: int = 12345) -> dict[str, float]:
    """Mean of :func:`vae_psnr`'s per-image figures by the renders' scene ("none": plain background),
    lowest first: where the VAE loses detail."""
    import numpy as np

    groups: dict[str, list[float]] = {}
    for spec, value in zip(psnr_specs(n, seed), psnr):
        groups.setdefault(spec.scene or "none", []).append(float(value))
    return dict(sorted(((scene, float(np.mean(v))) for scene, v in groups.items()), key=lambda kv: kv[1]))


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, n: int = 256, seed: int = 12345, batch_size: int = 32):
    """PSNR (dB) of ``vae`` reconstructions (posterior mean) of ``n`` fresh renders that no training set
    holds: held-out seeds, half of them held-out subjects. Returns (per-image PSNR array, renders, recs)."""
    import numpy as np

    from personalize.toyworld.world import render

    images = np.stack([render(s) for s in psnr_specs(n, seed)])
    recs = []
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    for start in range(0, n, batch_size):
        x = torch.from_numpy(images[start: start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x.to(device, dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
        recs.append(((rec + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8))
    recs = np.concatenate(recs)
    mse = ((recs.astype(np.float64) - images.astype(np.float64)) ** 2).reshape(n, -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), images, recs
