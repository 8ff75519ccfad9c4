"""The method interface and the denoising loss every diffusion method shares.

A method decides *what* trains (``setup``, ``trainable_modules``, ``trainable_parameters``), *on what*
(``dataset``) and *what it writes* (``export``); the trainer does everything else. The default
``loss`` is the standard noise-prediction loss with prior preservation, min-SNR and offset noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from personalize.methods import losses
from personalize.config import Config
from personalize.data.class_images import existing_class_images
from personalize.data.datasets import ImageDataset, PriorPairDataset, folder_examples, instance_examples, validated


class Method(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type]
    trains_text_encoder: bool = False  # whether text conditioning must be recomputed every step

    def __init__(self, config: Config):
        self.config = config
        self.options = config.method_config
        self.models = None  # the model bundle: given in setup, then the prepared one through bind
        self.text_cache = None  # with data.cache and frozen text encoders, given through bind

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Cross-section checks; raise ConfigError naming the key (:meth:`MethodOptions.validate`)."""
        cls.config_cls.validate(config)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, models) -> None:
        """Freeze everything; subclasses then unfreeze or inject what they train."""
        self.models = models
        for module in [models.unet, models.vae, *models.text_encoders]:
            module.requires_grad_(False)

    def bind(self, models, text_cache=None) -> None:
        """The trainer hands over, once, what :meth:`loss` runs on: the model bundle with the prepared (possibly
        DDP-wrapped) trainable modules, and the text-embedding cache when the text encoders are frozen."""
        self.models, self.text_cache = models, text_cache

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules that hold trainable parameters (the trainer wraps them for distributed training)."""

    def trainable_parameters(self) -> list[dict]:
        """Optimizer parameter groups; by default every parameter with requires_grad, one group."""
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return [{"params": params}]

    def full_precision_modules(self) -> list[nn.Module]:
        """Modules kept entirely in fp32 under mixed precision (frozen weights of others are cast)."""
        return []

    def gradient_checkpointing(self) -> None:
        models = self.models
        models.unet.enable_gradient_checkpointing()
        for name, module in self.trainable_modules().items():
            if name.startswith("text_encoder"):
                module.gradient_checkpointing_enable()

    # -- checkpoints: only trainable weights ----------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in self.trainable_modules().items():
            for name, param in unwrap(module).named_parameters():
                if param.requires_grad:
                    out[f"{prefix}.{name}"] = param.detach().cpu().contiguous()
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self.trainable_modules().items():
            module = unwrap(module)
            own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            expected = {n for n, p in module.named_parameters() if p.requires_grad}
            if missing := expected - set(own):
                raise RuntimeError(f"checkpoint lacks {len(missing)} trainable weights of {prefix}, e.g. {sorted(missing)[:3]}")
            with torch.no_grad():
                params = dict(module.named_parameters())
                for name, value in own.items():
                    params[name].copy_(value)

    # -- data -----------------------------------------------------------------------------------
    def dataset(self):
        data = self.config.data
        instance = ImageDataset(instance_examples(data), data.resolution, data.center_crop, data.random_flip,
                                data.caption_dropout)
        if not self.config.prior.enabled:
            return instance
        prior = self.config.prior
        class_examples = validated(
            folder_examples(prior.class_images, prior.class_prompt, data.caption_extension, "prior.class_images"),
            data.min_image_size or data.resolution // 2, data.skip_bad_images, "prior.class_images")
        class_examples = class_examples[: prior.num_class_images]
        return PriorPairDataset(instance, ImageDataset(class_examples, data.resolution, data.center_crop,
                                                       data.random_flip))

    def needs_class_images(self) -> int:
        prior = self.config.prior
        if not prior.enabled:
            return 0
        return max(0, prior.num_class_images - len(existing_class_images(Path(prior.class_images))))

    def prompts(self, prompts: list[str]) -> list[str]:
        """Hook to rewrite prompts (Textual Inversion expands multi-vector placeholders)."""
        return prompts

    # -- the loss -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        prompts = self.prompts(prompts)
        if self.text_cache is not None:
            return self.text_cache(prompts, device)
        return self.models.encode_text(self.models.tokenize(prompts))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        models, train = self.models, self.config.train
        scheduler = models.noise_scheduler
        seeds = batch["sample_seeds"]
        device = next(unwrap(models.unet).parameters()).device
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            with torch.no_grad():
                mean, std = models.encode_images(batch["pixel_values"].to(device))
        mean, std = mean.float(), std.float()
        latents = mean + std * losses.per_sample_randn(seeds, tuple(mean.shape[1:]), stream=0, device=device)
        noise = losses.sample_noise(seeds, latents, train.noise_offset)
        timesteps = losses.sample_timesteps(seeds, scheduler.config.num_train_timesteps, device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        text = self.encode_prompts(batch["prompts"], device)
        conditioning = models.family.unet_conditioning(text, batch, self.config.data.resolution)
        prediction = models.unet(noisy, timesteps, **conditioning).sample
        target = losses.diffusion_target(scheduler, latents, noise, timesteps)
        mse = losses.per_sample_mse(prediction, target)
        weights = losses.min_snr_weights(scheduler, timesteps, train.snr_gamma) if train.snr_gamma else None
        n = batch["num_instance"] if "num_instance" in batch else len(mse)
        w_instance, w_prior = (None, None) if weights is None else losses.split_prior(weights, n)
        mse_instance, mse_prior = losses.split_prior(mse, n)
        out = {"diffusion_loss": losses.weighted_mean(mse_instance, w_instance)}
        if len(mse_prior):
            out["prior_loss"] = self.config.prior.prior_loss_weight * losses.weighted_mean(mse_prior, w_prior)
        return out

    def after_optimizer_step(self) -> None:
        """Hook run after every optimizer step (Textual Inversion restores frozen embedding rows)."""

    # -- output ---------------------------------------------------------------------------------
    @abstractmethod
    def export(self, models, out_dir: Path) -> list[Path]:
        """Write files stock diffusers can load; return their paths."""


def unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module
