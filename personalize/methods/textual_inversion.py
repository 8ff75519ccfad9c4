"""Textual Inversion (Gal et al. 2022): learn new token embedding(s) for a placeholder token while
every other weight, and every other embedding row, stays exactly as it was. Exports
``learned_embeds.safetensors`` (``pipe.load_textual_inversion(path, token=...)``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from personalize.config import ConfigError, option
from personalize.methods import register_method
from personalize.methods.base import Method
from personalize.methods.embeddings import TrainableEmbeddingRows, input_embedding


@dataclass
class TextualInversionConfig:
    placeholder_token: str = option("<sks>", "the new token that names the subject in prompts")
    initializer_token: str = option("object", "a single existing token whose embedding starts the new one(s)")
    num_vectors: int = option(1, "embedding vectors behind the placeholder (more = more capacity)")

    def __post_init__(self) -> None:
        if self.num_vectors < 1:
            raise ConfigError(f"textual_inversion.num_vectors: must be >= 1, got {self.num_vectors}")
        if not self.placeholder_token.strip() or " " in self.placeholder_token:
            raise ConfigError("textual_inversion.placeholder_token: must be one word without spaces")


@register_method
class TextualInversion(Method):
    name = "textual_inversion"
    config_cls = TextualInversionConfig
    trains_text_encoder = True

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        token = config.method_config.placeholder_token
        prompt = config.data.instance_prompt
        if prompt is not None and token not in prompt:
            raise ConfigError(f"data.instance_prompt: {prompt!r} does not contain the placeholder token {token!r}")

    @property
    def tokens(self) -> list[str]:
        token = self.options.placeholder_token
        return [token] + [f"{token}_{i}" for i in range(1, self.options.num_vectors)]

    def setup(self, models) -> None:
        super().setup(models)
        if models.family.name != "sd":
            raise ConfigError("method textual_inversion supports SD 1.x / 2.x base models; use lora for SDXL")
        tokenizer, encoder = models.tokenizer, models.text_encoder
        added = tokenizer.add_tokens(self.tokens)
        if added != len(self.tokens):
            raise ConfigError(f"textual_inversion.placeholder_token: {self.options.placeholder_token!r} "
                              "is already in the vocabulary; choose a new token such as '<my-dog>'")
        init_ids = tokenizer.encode(self.options.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ConfigError(f"textual_inversion.initializer_token: {self.options.initializer_token!r} "
                              f"is {len(init_ids)} tokens; it must be exactly one")
        encoder.resize_token_embeddings(len(tokenizer))
        self.token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        with torch.no_grad():
            weight = input_embedding(encoder)
            weight[self.token_ids] = weight[init_ids[0]].clone()
        self.rows = TrainableEmbeddingRows(lambda: input_embedding(self.models.text_encoder), self.token_ids)

    @property
    def embedding_weight(self) -> torch.nn.Parameter:
        return self.rows.weight

    def prompts(self, prompts: list[str]) -> list[str]:
        token = self.options.placeholder_token
        return [p.replace(token, " ".join(self.tokens)) for p in prompts] if len(self.tokens) > 1 else prompts

    def trainable_modules(self):
        return {"text_encoder": self.models.text_encoder}

    def full_precision_modules(self):
        return [self.models.text_encoder]  # its fp32 embedding rows feed layers that must match them

    def trainable_parameters(self):
        return [{"params": [self.embedding_weight]}]

    def after_optimizer_step(self) -> None:
        self.rows.restore_frozen_rows()

    def learned_embeds(self) -> torch.Tensor:
        return self.rows.learned()

    def trainable_state_dict(self):
        return {"learned_embeds": self.learned_embeds()}

    def load_trainable_state_dict(self, state) -> None:
        self.rows.load(state["learned_embeds"])

    def export(self, models, out_dir: Path) -> list[Path]:
        path = out_dir / "learned_embeds.safetensors"
        save_file({self.options.placeholder_token: self.learned_embeds()}, str(path))
        return [path]
