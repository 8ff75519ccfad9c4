"""Text-to-image fine-tuning (or training from scratch) of the U-Net and optionally the text
encoder on a captioned image folder or JSONL. The toy world pretrains its base model with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personalize.config import ConfigError, option
from personalize.methods.registry import register_method
from personalize.methods.dreambooth import DreamBooth


@dataclass
class Text2ImageConfig:
    train_text_encoder: bool = option(False, "also train the text encoder(s)")
    text_encoder_learning_rate: float | None = option(None, "text encoder LR (default: train.learning_rate)")
    from_scratch: bool = option(False, "re-initialize the U-Net (and text encoder, if trained) before training")
    export_single_file: bool = option(False, "also write model.safetensors in the original SD layout")


@register_method
class Text2Image(DreamBooth):
    name = "text2image"
    config_cls = Text2ImageConfig
    supports_prior_preservation = False

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        if config.data.instance_images is None and config.data.metadata is None:
            raise ConfigError("data: text2image needs data.metadata (JSONL) or data.instance_images with captions")

    def setup(self, models) -> None:
        if self.options.from_scratch:
            with torch.random.fork_rng():
                torch.manual_seed(self.config.train.seed)
                models.unet = type(models.unet).from_config(models.unet.config)
                if self.options.train_text_encoder:
                    models.text_encoders = [type(e)(e.config) for e in models.text_encoders]
        super().setup(models)
