"""The toy base model: a small Stable-Diffusion-architecture model (AutoencoderKL with 4x downsampling
and 4 latent channels, a CLIP text model with the real CLIP BPE tokenizer, a UNet2DConditionModel) for
64x64 toy-world images.

``toy-init`` is this architecture with seeded random weights: the starting point of the recipes in
``recipes/toy/`` that pretrain it with this project's own trainer. ``toy`` is the pretrained model
shipped in the repository (``personalize/toyworld/assets/toy-model``, diffusers format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from personalize.errors import ModelLoadError
from personalize.models.tokenizer import build_clip_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "toyworld" / "assets"  # shipped with the toy world
TOY_MODEL_DIR = ASSETS / "toy-model"
TOY_JUDGES = ASSETS / "judges.safetensors"

MAX_TOKENS = 32  # toy captions are short; the pipeline pads to the tokenizer's model_max_length
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64, 128], layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        sample_size=64, scaling_factor=1.0,
    )


def toy_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu", projection_dim=128,
    ))


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4,  # legacy name: the number of heads
        norm_num_groups=32,
    )


def toy_model_path() -> Path:
    """The shipped pretrained toy model, or a clear error if this checkout lacks it."""
    if not (TOY_MODEL_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the pretrained toy model is not in {TOY_MODEL_DIR}; train it with the recipes in recipes/toy/ "
            "(see docs/toy-model.md) or use model.base=toy-init for random weights")
    return TOY_MODEL_DIR


def build_toy_init(seed: int = 0) -> tuple[str, dict]:
    """(family, components) of the toy architecture with seeded random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        components = {
            "vae": toy_vae(), "text_encoder": toy_text_encoder(), "unet": toy_unet(),
            "tokenizer": build_clip_tokenizer(MAX_TOKENS), "scheduler": DDPMScheduler(**SCHEDULER),
        }
    return "sd", components
