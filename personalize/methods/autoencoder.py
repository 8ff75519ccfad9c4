"""Train the VAE (AutoencoderKL) of a base model on an image set: reconstruction (L1 + MSE + an
image-gradient term that keeps edges sharp) plus a small KL term that keeps the latent space smooth.

The toy world trains its VAE with it. The export is a diffusers ``vae/`` folder whose
``scaling_factor`` is set to 1 / std of the latents of the training images (as SD's 0.18215 was),
so a U-Net trained on it sees unit-variance latents; ``model.vae`` points a later recipe at it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from personalize.methods import losses
from personalize.data.datasets import prepare_image
from personalize.data.images import load_image
from personalize.methods.options import AutoencoderConfig
from personalize.methods.registry import register_method
from personalize.methods.base import Method, unwrap


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


@register_method
class Autoencoder(Method):
    name = "autoencoder"
    config_cls = AutoencoderConfig


    def setup(self, models) -> None:
        super().setup(models)
        models.vae.requires_grad_(True)
        if not self.options.train_encoder:
            models.vae.encoder.requires_grad_(False)
            if models.vae.quant_conv is not None:
                models.vae.quant_conv.requires_grad_(False)

    def trainable_modules(self):
        return {"vae": self.models.vae}

    def full_precision_modules(self):
        return [self.models.vae]  # a frozen encoder is exported with the decoder: keep it fp32

    def gradient_checkpointing(self) -> None:
        unwrap(self.models.vae).enable_gradient_checkpointing()

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        vae = self.models.vae
        device = next(unwrap(vae).parameters()).device
        pixels = batch["pixel_values"].to(device)
        with torch.set_grad_enabled(self.options.train_encoder):
            posterior = vae.encode(pixels).latent_dist
        eps = losses.per_sample_randn(batch["sample_seeds"], tuple(posterior.mean.shape[1:]), stream=0,
                                      device=device, dtype=posterior.mean.dtype)
        reconstruction = vae.decode(posterior.mean + posterior.std * eps).sample.float()
        o = self.options
        l1 = (reconstruction - pixels).abs().mean()
        mse = F.mse_loss(reconstruction, pixels)
        (rdy, rdx), (pdy, pdx) = _gradients(reconstruction), _gradients(pixels)
        grad = (rdy - pdy).abs().mean() + (rdx - pdx).abs().mean()
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        return {"reconstruction_loss": l1 + o.mse_weight * mse + o.gradient_weight * grad,
                "kl_loss": o.kl_weight * kl,
                "psnr": psnr(reconstruction.detach(), pixels).mean()}

    @torch.no_grad()
    def latent_std(self, vae, device) -> float:
        """Std of the posterior means of up to ``scaling_images`` training images."""
        examples = self.dataset().examples[: self.options.scaling_images]
        means = []
        for start in range(0, len(examples), 32):
            pixels = torch.stack([prepare_image(load_image(e.path), self.config.data.resolution, True, False, None)[0]
                                  for e in examples[start: start + 32]])
            means.append(vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float())
        return torch.cat(means).std().item()

    def export(self, models, out_dir: Path) -> list[Path]:
        vae = unwrap(models.vae)
        device = next(vae.parameters()).device
        std = self.latent_std(vae, device)
        if self.options.train_encoder:  # a frozen encoder keeps the latent space and its scaling_factor
            vae.register_to_config(scaling_factor=1.0 / std if math.isfinite(std) and std > 0 else 1.0)
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        info = out_dir / "vae" / "training.json"
        info.write_text(json.dumps({"latent_std": std, "scaling_factor": vae.config.scaling_factor}, indent=2))
        return [out_dir / "vae" / "config.json", out_dir / "vae" / "diffusion_pytorch_model.safetensors", info]
