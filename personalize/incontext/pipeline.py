"""``InContextPipeline``: K reference images (each with a caption) and a prompt in, images of that
subject in the prompt's context out, in one sampling run.

The references are encoded once per call (VAE, then the U-Net's encoder half); every denoising step
then runs the U-Net on three stacked inputs and combines them with two guidance scales:

    eps = e(0, 0) + text_scale * (e(c, 0) - e(0, 0)) + ref_scale * (e(c, R) - e(c, 0))

where ``c`` is the prompt (0: the empty prompt) and ``R`` the references (0: none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from personalize.data.images import DataError
from personalize.incontext.attention import ReferenceFeatures
from personalize.incontext.model import InContextSpec, encode_references, load_incontext, predict_noise
from personalize.utils.precision import warn_if_slow_bf16


class ReferenceImageError(DataError):
    """Reference images or captions that cannot be used; the message says which and why."""


def load_references(images: Sequence, captions: Optional[Sequence[str]], spec: InContextSpec,
                    allow_more: bool = False, default_caption: str = "a photo") -> tuple[list[Image.Image], list[str]]:
    """Check and read the references: paths or PIL images; captions one per image (or None: the default)."""
    from personalize.data.images import load_image

    if not images:
        raise ReferenceImageError("no reference images: give 1 or more (the model was trained with "
                             f"{spec.num_references})")
    if len(images) > spec.num_references and not allow_more:
        raise ReferenceImageError(f"{len(images)} reference images, but this model was trained with at most "
                             f"{spec.num_references}; pass fewer, or allow more (--allow-more-references)")
    if captions is not None and len(captions) != len(images):
        raise ReferenceImageError(f"{len(images)} reference images but {len(captions)} reference captions: give one "
                             "caption per image, in the same order")
    if captions is not None and not all(isinstance(c, str) for c in captions):
        raise ReferenceImageError(f"reference captions must be strings, got {list(captions)!r}")
    loaded = []
    for item in images:
        if isinstance(item, Image.Image):
            loaded.append(item.convert("RGB"))
            continue
        path = Path(item)
        if path.exists() and not path.is_file():  # a folder, a device (/dev/zero), a fifo: never opened
            raise ReferenceImageError(f"reference image {item}: not a regular file")
        try:
            loaded.append(load_image(path))
        except DataError as err:
            raise ReferenceImageError(f"reference image {item}: {err}") from None
    return loaded, list(captions) if captions is not None else [default_caption] * len(loaded)


class InContextPipeline:
    """A base model (any :class:`personalize.models.Models`) with in-context weights installed."""

    def __init__(self, models, spec: InContextSpec, resolution: Optional[int] = None):
        self.models, self.spec = models, spec
        vae = models.vae
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution or models.unet.config.sample_size * self.vae_scale
        self.reference_encodings = 0  # how many times the references were encoded (once per call)

    @classmethod
    def from_pretrained(cls, incontext: str | Path, base: str = "toy", device=None, **model_options):
        from personalize.config import ModelConfig
        from personalize.models import load_models

        models = load_models(ModelConfig(base=base, **model_options))
        spec = load_incontext(models.unet, incontext, models.family.name)
        if spec.lora is not None:  # generation only: merge LoRA into the U-Net's weights, no extra matmuls
            models.unet.fuse_lora()
        pipe = cls(models, spec)
        return pipe.to(device) if device is not None else pipe

    def to(self, device):
        for module in [self.models.unet, self.models.vae, *self.models.text_encoders]:
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.models.unet.parameters()).device

    def _conditioning(self, prompts: list[str]) -> dict:
        models = self.models
        text = models.encode_text(models.tokenize(prompts))
        return models.family.unet_conditioning(text, {}, self.resolution)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        from personalize.data.datasets import prepare_image

        return torch.stack([prepare_image(im, self.resolution, True, False, None)[0] for im in images])

    @torch.no_grad()
    def encode_references(self, images: list[Image.Image], captions: list[str]) -> ReferenceFeatures:
        self.reference_encodings += 1
        latents, _ = self.models.encode_images(self._pixels(images).to(self.device))
        return encode_references(self.models.unet, latents.float(), self._conditioning(captions), len(images),
                                 self.spec.reference_timestep)

    @torch.no_grad()
    def __call__(self, prompt: str, references: Sequence, reference_captions: Optional[Sequence[str]] = None,
                 num_images: int = 1, text_scale: float = 4.0, ref_scale: Optional[float] = None, steps: int = 25,
                 seed: int = 0, allow_more_references: bool = False, bf16: bool = False,
                 ref_interval: Optional[tuple[float, float]] = None) -> list[Image.Image]:
        """``num_images`` images of the references' subject for ``prompt``; image j uses seed ``seed + j``.
        ``bf16``: reference encoding and the U-Net under bfloat16 autocast (the scheduler and the VAE decoder
        stay in float32), as the trainer's ``mixed_precision: bf16``; faster on CPUs with bf16 instructions, much
        slower on CPUs without them (:mod:`personalize.utils.precision`). ``ref_interval=(lo, hi)``: reference
        guidance only at noise levels ``lo <= t / T <= hi`` (T: the training timesteps), as guidance in a
        limited interval (Kynkaanniemi et al., 2024); elsewhere the reference scale is 1 (the references are
        used, not amplified). ``ref_scale=None``: the model's own (``spec.default_ref_scale``)."""
        device = self.device
        if ref_scale is None:
            ref_scale = self.spec.default_ref_scale
        if bf16:
            warn_if_slow_bf16(device.type, "in-context sampling with bf16")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            latents = self._sample(prompt, references, reference_captions, num_images, text_scale, ref_scale, steps,
                                   seed, allow_more_references, ref_interval)
        return self.decode(latents)

    def _sample(self, prompt, references, reference_captions, num_images, text_scale, ref_scale, steps, seed,
                allow_more_references, ref_interval=None) -> torch.Tensor:
        from diffusers import DDIMScheduler

        for name, value in (("num_images", num_images), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number of at least 1, got {value!r}")
        if ref_interval is not None and not 0.0 <= ref_interval[0] <= ref_interval[1] <= 1.0:
            raise ValueError(f"reference guidance interval {tuple(ref_interval)}: give 0 <= lo <= hi <= 1 (fractions "
                             "of the noise schedule)")

        images, captions = load_references(references, reference_captions, self.spec, allow_more_references)
        features = self.encode_references(images, captions)
        n = num_images
        device = self.device
        scheduler = DDIMScheduler.from_config(self.models.noise_scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        size = self.resolution // self.vae_scale
        channels = self.models.unet.config.in_channels
        latents = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed + j))
                               for j in range(n)]).to(device) * scheduler.init_noise_sigma
        text = self._conditioning([""] * n + [prompt] * (2 * n))  # e(0,0), e(c,0), e(c,R)
        mask = torch.cat([torch.zeros(2 * n), torch.ones(n)]).to(device)
        reference = ReferenceFeatures({k: v.expand(n, -1, -1) for k, v in features.tokens.items()}).repeat(3, mask)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 3), t)
            noise = predict_noise(self.models.unet, model_input, t.expand(3 * n), text, reference).float()
            e00, ec0, ecr = noise.chunk(3)
            scale = ref_scale
            if ref_interval is not None:
                level = float(t) / scheduler.config.num_train_timesteps
                scale = ref_scale if ref_interval[0] <= level <= ref_interval[1] else 1.0
            eps = e00 + text_scale * (ec0 - e00) + scale * (ecr - ec0)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.models.vae
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        return [Image.fromarray(a) for a in array]
