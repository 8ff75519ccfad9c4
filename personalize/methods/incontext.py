"""In-context subject generation (SuTI / Re-Imagen style): train reference attention (and optionally
LoRA on the U-Net) so that the model, shown K example image-caption pairs of a subject, generates that
subject for a new prompt with no per-subject training.

Each sample is a target of a cluster (``incontext.manifest``, see :mod:`personalize.data.clusters`)
with K other members as examples. The examples' clean latents go through the U-Net's own encoder
half (each with its own caption); the target is denoised with reference attention to those features.
Text and references are dropped independently (``text_dropout``, ``reference_dropout``) so that
sampling can guide on each (:class:`personalize.incontext.pipeline.InContextPipeline`).
Exports ``incontext_weights.safetensors`` + ``incontext_config.json`` for ``personalize zero-shot``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from personalize.methods import losses
from personalize.data.clusters import ClusterDataset, read_manifest
from personalize.incontext.attention import install_reference_attention, reference_parameters
from personalize.incontext.model import InContextSpec, encode_references, predict_noise, save_incontext
from personalize.methods.options import InContextConfig
from personalize.methods.registry import register_method
from personalize.methods.base import Method, unwrap


def _keep_references(seeds: list[int], p: float) -> torch.Tensor:
    """Per-sample reference mask from the sample seeds (1 = keep the references)."""
    return torch.tensor([float(random.Random(s * 7 + 3).random() >= p) for s in seeds])


@register_method
class InContext(Method):
    name = "incontext"
    config_cls = InContextConfig


    def lora_config(self) -> Optional[dict]:
        if not self.options.lora_rank:
            return None
        return {"r": self.options.lora_rank, "lora_alpha": self.options.lora_rank, "init_lora_weights": "gaussian",
                "target_modules": list(self.options.lora_target_modules)}

    def setup(self, models) -> None:
        super().setup(models)
        install_reference_attention(models.unet, self.options.blocks, self.options.reference_query)
        if self.options.init_from:
            self._init_from(models)  # loads the saved layers, and the saved LoRA if it has one
        lora = self.lora_config()
        if lora is not None and not getattr(models.unet, "peft_config", None):
            from peft import LoraConfig

            models.unet.add_adapter(LoraConfig(**lora))
        for p in reference_parameters(models.unet):
            p.requires_grad_(True)

    def _init_from(self, models) -> None:
        """Start from a trained in-context model. The recipe may grow it: reference attention in more
        block groups, LoRA where it had none or on more modules (same rank), more examples per target (K;
        the layers do not depend on it); the added layers start at zero (LoRA B = 0), so training starts
        from exactly the saved model's predictions."""
        from personalize.incontext.model import InContextLoadError, load_incontext, read_spec

        spec = read_spec(self.options.init_from)  # a clear error if the folder is not an in-context model
        given_rank = (spec.lora or {}).get("r", 0)
        problems = {}
        if not set(spec.blocks) <= set(self.options.blocks):
            problems["blocks"] = (sorted(spec.blocks), sorted(self.options.blocks))
        if spec.reference_query != self.options.reference_query:
            problems["reference_query"] = (spec.reference_query, self.options.reference_query)
        if spec.num_references > self.options.num_references:  # more examples per target: the layers are K-agnostic
            problems["num_references"] = (spec.num_references, self.options.num_references)
        if given_rank not in (0, self.options.lora_rank):
            problems["lora_rank"] = (given_rank, self.options.lora_rank)
        given_targets = set((spec.lora or {}).get("target_modules") or [])
        if given_rank and not given_targets <= set(self.options.lora_target_modules):
            problems["lora_target_modules"] = (sorted(given_targets), sorted(self.options.lora_target_modules))
        if problems:
            raise InContextLoadError(f"incontext.init_from: {self.options.init_from} does not match this recipe "
                                     f"(its value, the recipe's; the recipe may add block groups, LoRA to a model "
                                     f"without it and LoRA target modules, and raise K): {problems}")
        load_incontext(models.unet, self.options.init_from, models.family.name, grow=True,
                       lora=self.lora_config() if given_rank else None)

    def trainable_modules(self):
        return {"unet": self.models.unet}

    def trainable_parameters(self):
        unet = unwrap(self.models.unet)
        new = reference_parameters(unet)
        groups = [{"params": new}]
        if self.options.lora_rank:
            ids = {id(p) for p in new}
            lora = [p for p in unet.parameters() if p.requires_grad and id(p) not in ids]
            groups.append({"params": lora, "lr": self.options.lora_learning_rate or self.config.train.learning_rate})
        return groups

    def dataset(self):
        data = self.config.data
        if self.options.toyworld_subjects:
            from personalize.data.toy_clusters import render_clusters

            render_clusters(self.options.manifest, self.options.toyworld_subjects, self.options.toyworld_per_subject,
                            self.options.toyworld_seed, progress=self.config.train.progress_bar)
        return ClusterDataset(read_manifest(self.options.manifest), self.options.num_references, data.resolution,
                              caption_dropout=self.options.text_dropout, random_flip=data.random_flip)

    def spec(self) -> InContextSpec:
        return InContextSpec(family=self.models.family.name, blocks=list(self.options.blocks),
                             num_references=self.options.num_references,
                             reference_timestep=self.options.reference_timestep,
                             reference_query=self.options.reference_query, lora=self.lora_config(),
                             base=self.models.source)

    def _latents(self, batch: dict, prefix: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        if f"{prefix}latent_mean" in batch:
            return batch[f"{prefix}latent_mean"].to(device).float(), batch[f"{prefix}latent_std"].to(device).float()
        pixels = batch[f"{prefix}pixel_values"].to(device)
        shape = pixels.shape
        with torch.no_grad():
            mean, std = self.models.encode_images(pixels.flatten(0, len(shape) - 4))
        return mean.float().view(*shape[:-3], *mean.shape[1:]), std.float().view(*shape[:-3], *std.shape[1:])

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        models, train, o = self.models, self.config.train, self.options
        unet, scheduler, seeds = models.unet, models.noise_scheduler, batch["sample_seeds"]
        device = next(unwrap(unet).parameters()).device
        mean, std = self._latents(batch, "", device)
        ref_latents = self._latents(batch, "reference_", device)[0].flatten(0, 1)  # clean: posterior means
        latents = mean + std * losses.per_sample_randn(seeds, tuple(mean.shape[1:]), stream=0, device=device)
        noise = losses.sample_noise(seeds, latents, train.noise_offset)
        timesteps = losses.sample_timesteps(seeds, scheduler.config.num_train_timesteps, device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        resolution = self.config.data.resolution
        conditioning = models.family.unet_conditioning(self.encode_prompts(batch["prompts"], device), batch, resolution)
        ref_conditioning = models.family.unet_conditioning(
            self.encode_prompts(batch["reference_prompts"], device), {}, resolution)
        with torch.set_grad_enabled(bool(o.lora_rank)):  # a frozen encoder needs no graph
            reference = encode_references(unwrap(unet), ref_latents, ref_conditioning, o.num_references,
                                          o.reference_timestep)
        reference.mask = _keep_references(seeds, o.reference_dropout).to(device)
        prediction = predict_noise(unet, noisy, timesteps, conditioning, reference)
        target = losses.diffusion_target(scheduler, latents, noise, timesteps)
        mse = losses.per_sample_mse(prediction, target)
        weights = losses.min_snr_weights(scheduler, timesteps, train.snr_gamma) if train.snr_gamma else None
        return {"diffusion_loss": losses.weighted_mean(mse, weights)}

    def export(self, models, out_dir: Path) -> list[Path]:
        return save_incontext(unwrap(models.unet), self.spec(), out_dir)
