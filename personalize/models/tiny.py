"""Built-in tiny models with random weights: the same architectures as SD 1.x, SD 2.x (v-prediction)
and SDXL at a few hundred thousand parameters, for tests and CPU smoke runs. Nothing is downloaded.

They cannot make real pictures (their weights are random); they exercise every code path.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from personalize.models.tokenizer import build_clip_tokenizer

TINY_MODELS = ("tiny-sd", "tiny-sd2-v", "tiny-sdxl")


def _text_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, projection_dim=projection_dim, hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=64,
    )


def build_tiny(name: str, seed: int = 0):
    """Return (family_name, components dict) of the tiny model ``name`` with seeded random weights."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        common = dict(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        )
        scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, steps_offset=1, clip_sample=False)
        tokenizer = build_clip_tokenizer()
        if name == "tiny-sdxl":
            unet = UNet2DConditionModel(
                **common, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 1),
            )
            components = {
                "unet": unet, "vae": _vae(),
                "text_encoder": CLIPTextModel(_text_config()),
                "text_encoder_2": CLIPTextModelWithProjection(_text_config()),
                "tokenizer": tokenizer, "tokenizer_2": build_clip_tokenizer(),
                "scheduler": DDPMScheduler(**scheduler),
            }
            return "sdxl", components
        v_pred = name == "tiny-sd2-v"
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4) if v_pred else 8,
            use_linear_projection=v_pred,
        )
        components = {
            "unet": unet, "vae": _vae(), "text_encoder": CLIPTextModel(_text_config()), "tokenizer": tokenizer,
            "scheduler": DDPMScheduler(**scheduler, prediction_type="v_prediction" if v_pred else "epsilon"),
        }
        return "sd", components
