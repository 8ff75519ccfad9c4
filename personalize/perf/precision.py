"""How fast autocast precisions train on this CPU: one U-Net training step of the shipped toy model (forward,
MSE, backward) in float32 and under bfloat16 autocast, the median of a few timed steps after warm-up.
``eval/cpu_precision.py`` is the command line; it explains ``train.mixed_precision: auto``
(:mod:`personalize.utils.precision`), which picks bf16 on a CPU only where it has bfloat16 instructions."""

from __future__ import annotations

import statistics
import time

import torch


def toy_unet_step_seconds(precision: str, batch: int = 8, steps: int = 3, warmup: int = 1, seed: int = 0) -> float:
    """Median seconds of a training step of the toy U-Net on ``batch`` random 16x16 latents, ``precision``
    ``no`` (float32) or ``bf16`` (autocast; the weights stay float32, as the trainer keeps trainable ones)."""
    from diffusers import UNet2DConditionModel

    from personalize.models.toy import toy_model_path

    unet = UNet2DConditionModel.from_pretrained(str(toy_model_path()), subfolder="unet", torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    text = torch.randn(batch, 32, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(sample.shape, generator=g)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            prediction = unet(sample, timesteps, text).sample
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        unet.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
