"""Text-to-image fine-tuning (or training from scratch) of the U-Net and optionally the text
encoder on a captioned image folder or JSONL. The toy world pretrains its base model with it."""

from __future__ import annotations


import torch

from personalize.methods.options import Text2ImageConfig
from personalize.methods.registry import register_method
from personalize.methods.dreambooth import DreamBooth


@register_method
class Text2Image(DreamBooth):
    name = "text2image"
    config_cls = Text2ImageConfig


    def setup(self, models) -> None:
        if self.options.from_scratch:
            with torch.random.fork_rng():
                torch.manual_seed(self.config.train.seed)
                models.unet = type(models.unet).from_config(models.unet.config)
                if self.options.train_text_encoder:
                    models.text_encoders = [type(e)(e.config) for e in models.text_encoders]
        super().setup(models)
