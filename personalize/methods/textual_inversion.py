"""Textual Inversion (Gal et al. 2022): learn new token embedding(s) for a placeholder token while
every other weight, and every other embedding row, stays exactly as it was. Exports
``learned_embeds.safetensors`` (``pipe.load_textual_inversion(path, token=...)``). :func:`load_embeddings`
loads it (or an A1111 / SDXL embedding) into a pipeline, refusing one made for another model and a
token the tokenizer already has."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from personalize.config import ConfigError
from personalize.errors import DataError, ModelLoadError
from personalize.methods.options import TextualInversionConfig
from personalize.methods.registry import register_method
from personalize.methods.base import Method
from personalize.methods.embeddings import TrainableEmbeddingRows, input_embedding


EMBEDDINGS_FILE = "learned_embeds.safetensors"


@register_method
class TextualInversion(Method):
    name = "textual_inversion"
    config_cls = TextualInversionConfig
    trains_text_encoder = True


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
        path = out_dir / EMBEDDINGS_FILE
        save_file({self.options.placeholder_token: self.learned_embeds()}, str(path))
        return [path]


def embedding_vectors(state: dict, file: Path, option: str = "--embeddings") -> tuple[Optional[str], dict]:
    """(the token the file stores or None, its vectors): ``{"": tensor}`` for an SD 1.x / 2.x embedding
    (this project's and diffusers' ``{token: tensor}``, A1111's ``string_to_param`` / ``emb_params``),
    ``{"clip_l": ..., "clip_g": ...}`` for an SDXL one."""
    if "clip_l" in state and "clip_g" in state:
        token, vectors = None, {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}
    elif "string_to_param" in state and isinstance(state["string_to_param"], dict) and "*" in state["string_to_param"]:
        token, vectors = state.get("name"), {"": state["string_to_param"]["*"]}
    elif "emb_params" in state:
        token, vectors = None, {"": state["emb_params"]}
    elif len(state) == 1:
        (token, tensor), = state.items()
        vectors = {"": tensor}
    else:
        keys = ", ".join(sorted(map(str, state))[:5])
        raise DataError(f"{option}: {file} is not a Textual Inversion embedding (keys: {keys})")
    for vector in vectors.values():
        if not isinstance(vector, torch.Tensor) or vector.ndim not in (1, 2) or not vector.is_floating_point():
            raise DataError(f"{option}: {file} is not a Textual Inversion embedding (no vectors of floats)")
    return (token if isinstance(token, str) else None), vectors


def load_embeddings(pipe, file: Path, state: dict, token: Optional[str] = None, option: str = "--embeddings",
                    token_option: str = "--token", base: str = "the base model") -> list[str]:
    """Add the embedding ``file`` (``state``: its content, already read) to ``pipe``'s tokenizer(s) and text
    encoder(s) under ``token`` (default: the one the file stores), with diffusers' ``load_textual_inversion``;
    returns the tokens added (``token``, ``token_1``, ... for several vectors). Refused before anything
    changes: an SD 1.x / 2.x embedding on SDXL (or the reverse), vectors of another width, no token, a
    token (or one of its extra vectors' tokens) the tokenizer already has."""
    stored, vectors = embedding_vectors(state, file, option)
    encoders = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2))
    if len(encoders) == 2 and "clip_g" not in vectors:
        raise ModelLoadError(f"{option}: {file} is a Stable Diffusion 1.x / 2.x embedding (one text encoder); "
                             f"{base} is SDXL, whose embeddings hold vectors for both of its text encoders "
                             "(clip_l and clip_g). Use an SD 1.x / 2.x base, or an SDXL embedding")
    if len(encoders) == 1 and "clip_g" in vectors:
        raise ModelLoadError(f"{option}: {file} is an SDXL embedding (clip_l and clip_g); {base} is an SD 1.x / 2.x "
                             "model with one text encoder. Use an SDXL base")
    given = token is not None
    token = token if given else stored
    source = f"{token_option}:" if given else f"{option}: {file}: its stored token"
    if token is None:
        raise ConfigError(f"{token_option}: {file} stores no token; name the one prompts will use, "
                          f"e.g. {token_option} '<my-dog>'")
    if not token.strip() or any(c.isspace() for c in token):
        raise ConfigError(f"{source} {token!r} must be one word without spaces")
    ordered = [vectors[""]] if len(encoders) == 1 else [vectors["clip_l"], vectors["clip_g"]]
    for (encoder, tokenizer), vector in zip(encoders, ordered):
        width = encoder.get_input_embeddings().weight.shape[1]
        if vector.shape[-1] != width:
            raise ModelLoadError(f"{option}: {file} holds {vector.shape[-1]}-wide vectors, but the text encoder of "
                                 f"{base} takes {width}-wide ones; the embedding was made for another model")
        count = vector.shape[0] if vector.ndim == 2 else 1
        tokens = [token] + [f"{token}_{i}" for i in range(1, count)]
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            suggestion = f"<{token.strip('<>')}-1>"
            raise ConfigError(f"{source} {taken[0]!r} is already a token of {base}'s tokenizer, so the embedding "
                              f"would not be used; choose a new word such as {suggestion!r} with {token_option}")
    for (encoder, tokenizer), vector in zip(encoders, ordered):
        pipe.load_textual_inversion(vector, token=token, text_encoder=encoder, tokenizer=tokenizer)
    return tokens
