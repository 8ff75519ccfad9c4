"""Model families: how a family turns prompts into U-Net conditioning.

SD 1.x / 2.x: one CLIP text encoder, its last hidden state is the cross-attention context.
SDXL: two text encoders (penultimate hidden states, concatenated), the second's pooled projection,
and size/crop "time ids" as added conditions. Everything else in the project is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


@dataclass(frozen=True)
class Family:
    name: str

    @property
    def pipeline_class(self):
        return StableDiffusionXLPipeline if self.name == "sdxl" else StableDiffusionPipeline

    def tokenize(self, tokenizers, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids, one (batch, max_length) tensor per tokenizer."""
        return [
            tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in tokenizers
        ]

    def encode(self, text_encoders, input_ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Text conditioning: ``prompt_embeds`` and, for SDXL, ``pooled_prompt_embeds``."""
        if self.name == "sd":
            (encoder,), (ids,) = text_encoders, input_ids
            return {"prompt_embeds": encoder(ids.to(encoder.device))[0]}
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict, resolution: int) -> dict:
        """Keyword arguments for ``unet(latents, t, **kwargs)`` from encoded text and the batch."""
        kwargs = {"encoder_hidden_states": text["prompt_embeds"]}
        if self.name == "sdxl":
            n = text["prompt_embeds"].shape[0]
            original = batch.get("original_size", torch.tensor([[resolution, resolution]] * n))
            crop = batch.get("crop_top_left", torch.zeros(n, 2, dtype=torch.long))
            target = torch.tensor([[resolution, resolution]] * n)
            time_ids = torch.cat([original, crop, target], dim=1).to(text["prompt_embeds"])
            kwargs["added_cond_kwargs"] = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids}
        return kwargs


SD = Family("sd")
SDXL = Family("sdxl")
FAMILIES = {"sd": SD, "sdxl": SDXL}
