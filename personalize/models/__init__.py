"""Base models: loading (hub id, local folder, single file, built-in tiny), the family adapter, and
the :class:`Models` bundle the trainer and methods work with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from personalize.models.family import FAMILIES, Family
from personalize.models.loading import ModelLoadError, load_components, load_vae
from personalize.models.tiny import TINY_MODELS

__all__ = ["Models", "load_models", "ModelLoadError", "TINY_MODELS", "Family"]


@dataclass
class Models:
    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    source: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        return self.family.tokenize(self.tokenizers, prompts)

    def encode_text(self, input_ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.family.encode(self.text_encoders, input_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, in the U-Net's latent scale."""
        vae = self.vae
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        return dist.mean * scale, dist.std * scale

    def components(self) -> dict:
        out = {
            "unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoders[0],
            "tokenizer": self.tokenizers[0],
            "scheduler": DDIMScheduler.from_config(self.noise_scheduler.config),
        }
        if self.family.name == "sdxl":
            out["text_encoder_2"], out["tokenizer_2"] = self.text_encoders[1], self.tokenizers[1]
        else:
            out.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return out

    def pipeline(self):
        """A stock diffusers pipeline over these (possibly adapted) modules."""
        pipe = self.family.pipeline_class(**self.components())
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_models(config) -> Models:
    """Load the base model described by a :class:`personalize.config.ModelConfig`."""
    family_name, comps = load_components(config)
    if config.vae:
        comps["vae"] = load_vae(config.vae)
    if config.attention == "classic":  # diffusers' plain AttnProcessor: faster backward than SDPA on CPU
        from diffusers.models.attention_processor import AttnProcessor
        comps["unet"].set_attn_processor(AttnProcessor())
    if config.family not in ("auto", family_name):
        raise ModelLoadError(f"model.family: {config.base} is an {family_name} model, not {config.family}")
    scheduler = comps["scheduler"]
    if config.prediction_type != "auto":
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=config.prediction_type)
    text_encoders = [comps["text_encoder"]] + ([comps["text_encoder_2"]] if family_name == "sdxl" else [])
    tokenizers = [comps["tokenizer"]] + ([comps["tokenizer_2"]] if family_name == "sdxl" else [])
    return Models(
        family=FAMILIES[family_name], unet=comps["unet"], vae=comps["vae"], text_encoders=text_encoders,
        tokenizers=tokenizers, noise_scheduler=scheduler, source=config.base,
    )
