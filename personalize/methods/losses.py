"""Loss helpers shared by every diffusion method: pure functions, no state.

Randomness is drawn per *sample* from a seed the data sampler attaches to it, so a batch split over
two processes draws exactly what one process with the doubled batch draws, and a resumed run draws
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_randn(seeds: list[int], shape: tuple[int, ...], stream: int, device=None, dtype=None) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed; ``stream`` separates independent draws."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed) * 16 + stream)
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out).to(device=device, dtype=dtype)


def per_sample_uniform(seeds: list[int], stream: int) -> torch.Tensor:
    """One uniform [0, 1) number per seed."""
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed(int(s) * 16 + stream)) for s in seeds])


def sample_timesteps(seeds: list[int], num_train_timesteps: int, device=None) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), one per sample."""
    u = per_sample_uniform(seeds, stream=1)
    return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1).to(device)


def sample_noise(seeds: list[int], latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``; with ``noise_offset`` adds a per-channel constant (offset noise)."""
    noise = per_sample_randn(seeds, tuple(latents.shape[1:]), stream=2, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = per_sample_randn(seeds, (latents.shape[1], 1, 1), stream=3, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the noise scheduler config")


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 for each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) for an epsilon or v-prediction MSE loss."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr.clamp(min=1e-8)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, prediction.ndim)))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).mean()


def split_prior(tensor: torch.Tensor, num_instance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch is [instance samples..., class samples...]; return the two halves."""
    return tensor[:num_instance], tensor[num_instance:]
