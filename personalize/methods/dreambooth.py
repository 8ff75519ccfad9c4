"""DreamBooth (Ruiz et al. 2022): fine-tune the whole U-Net (and optionally the text encoder) on a few
photos of a subject bound to a rare token, with a class-prior preservation loss against drift."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from personalize.config import option
from personalize.methods import register_method
from personalize.methods.base import Method


@dataclass
class DreamBoothConfig:
    train_text_encoder: bool = option(False, "also fine-tune the text encoder(s)")
    text_encoder_learning_rate: Optional[float] = option(None, "text encoder LR (default: train.learning_rate)")
    export_single_file: bool = option(False, "also write model.safetensors in the original SD layout (A1111/ComfyUI)")


@register_method
class DreamBooth(Method):
    name = "dreambooth"
    config_cls = DreamBoothConfig
    supports_prior_preservation = True

    def setup(self, models) -> None:
        super().setup(models)
        models.unet.requires_grad_(True)
        self.trains_text_encoder = self.options.train_text_encoder
        if self.trains_text_encoder:
            for encoder in models.text_encoders:
                encoder.requires_grad_(True)

    def trainable_modules(self):
        modules = {"unet": self.models.unet}
        if self.trains_text_encoder:
            for i, encoder in enumerate(self.models.text_encoders):
                modules[f"text_encoder{'_' + str(i + 1) if i else ''}"] = encoder
        return modules

    def trainable_parameters(self):
        groups = [{"params": [p for p in self.models.unet.parameters() if p.requires_grad]}]
        if self.trains_text_encoder:
            lr = self.options.text_encoder_learning_rate or self.config.train.learning_rate
            params = [p for e in self.models.text_encoders for p in e.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": lr})
        return groups

    def export(self, models, out_dir: Path) -> list[Path]:
        pipe = models.pipeline()
        pipe.save_pretrained(out_dir, safe_serialization=True)
        written = [out_dir / "model_index.json"]
        if self.options.export_single_file:
            from personalize.models.single_file import save_single_file

            written.append(save_single_file(models, out_dir / "model.safetensors"))
        return written
