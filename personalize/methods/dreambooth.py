"""DreamBooth (Ruiz et al. 2022): fine-tune the whole U-Net (and optionally the text encoder) on a few
photos of a subject bound to a rare token, with a class-prior preservation loss against drift.

``identifier_token`` adds pivotal tuning (what diffusers' advanced DreamBooth LoRA script calls
``--train_text_encoder_ti``, here beside the full U-Net): the input embedding of the rare
identifier word trains with the U-Net, so the word itself comes to carry the subject, while every other
row and layer of the text encoder stays frozen and class prompts ("a dog") are encoded exactly as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from personalize.config import ConfigError
from personalize.methods.options import DreamBoothConfig
from personalize.methods.registry import register_method
from personalize.methods.base import Method
from personalize.methods.embeddings import TrainableEmbeddingRows, input_embedding


@register_method
class DreamBooth(Method):
    name = "dreambooth"
    config_cls = DreamBoothConfig

    @staticmethod
    def _identifier(options) -> Optional[str]:
        return getattr(options, "identifier_token", None)  # text2image reuses this class and has none


    def setup(self, models) -> None:
        super().setup(models)
        models.unet.requires_grad_(True)
        self.identifier_rows = []
        token = self._identifier(self.options)
        self.trains_text_encoder = self.options.train_text_encoder or token is not None
        if self.options.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.requires_grad_(True)
        elif token is not None:
            for i, tokenizer in enumerate(models.tokenizers):
                ids = tokenizer.encode(token, add_special_tokens=False)
                if len(ids) != 1:
                    raise ConfigError(f"dreambooth.identifier_token: {token!r} is {len(ids)} tokens for the "
                                      f"tokenizer of text encoder {i + 1}; choose a word that is one token (e.g. sks)")
                self.identifier_rows.append(TrainableEmbeddingRows(
                    lambda i=i: input_embedding(self.models.text_encoders[i]), ids))

    def trainable_modules(self):
        modules = {"unet": self.models.unet}
        if self.trains_text_encoder:  # with identifier_token only its embedding matrix has requires_grad
            for i, encoder in enumerate(self.models.text_encoders):
                modules[f"text_encoder{'_' + str(i + 1) if i else ''}"] = encoder
        return modules

    def trainable_parameters(self):
        groups = [{"params": [p for p in self.models.unet.parameters() if p.requires_grad]}]
        if self.options.train_text_encoder:
            lr = self.options.text_encoder_learning_rate or self.config.train.learning_rate
            params = [p for e in self.models.text_encoders for p in e.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": lr})
        elif self.identifier_rows:
            lr = self.options.identifier_learning_rate or self.config.train.learning_rate
            groups.append({"params": [rows.weight for rows in self.identifier_rows], "lr": lr})
        return groups

    def full_precision_modules(self):
        # the trained fp32 embedding rows feed the text encoder's layers, which must match them
        return list(self.models.text_encoders) if self.identifier_rows else []

    def after_optimizer_step(self) -> None:
        for rows in self.identifier_rows:
            rows.restore_frozen_rows()

    def export(self, models, out_dir: Path) -> list[Path]:
        pipe = models.pipeline()
        # every component in fp32, so each config records float32: transformers 5 loads a text encoder in its
        # config's dtype when none is given while diffusers loads the U-Net in fp32, and a folder whose
        # components disagree fails in a plain `StableDiffusionPipeline.from_pretrained(out)` call
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and component.dtype != torch.float32:
                component.to(torch.float32)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        written = [out_dir / "model_index.json"]
        if self.options.export_single_file:
            from personalize.models.single_file import save_single_file

            written.append(save_single_file(models, out_dir / "model.safetensors"))
        return written
