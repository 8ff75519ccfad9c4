"""Embedders: :class:`Embedder` (the interface an index is built and queried with),
:class:`OpenClipEmbedder` (real photos), :class:`ToyEmbedder` (the toy world), :func:`embedder_for` (the
built-in embedder an index names), :func:`state_fingerprint` (weights fingerprints) and :func:`normalize`."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from personalize.retrieval.errors import RetrievalError


def normalize(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows as contiguous float32 with unit L2 norm (an all-zero row stays zero)."""
    array = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected embeddings shaped (n, d), got {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)

def state_fingerprint(*parts: torch.nn.Module | dict | bytes | str) -> str:
    """A stable sha256 over modules' state dicts (each tensor's name, dtype, shape and bytes, in key order),
    plain dicts of tensors, bytes and strings: it changes when any weight changes."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode("utf-8")
        if isinstance(part, bytes):
            digest.update(b"bytes:" + str(len(part)).encode() + b":" + part)
            continue
        state = part.state_dict() if isinstance(part, torch.nn.Module) else part
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Embedder(ABC):
    """Embeds captions and images into the spaces an index searches. ``name`` says which model and how;
    ``fingerprint`` identifies its weights (a query must use the embedder the index was built with)."""

    name: str = "embedder"

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable string that identifies the weights, e.g. a sha256 over the state dict's tensors."""

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(n, d_text) embeddings of ``n`` texts."""

    @abstractmethod
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """(n, d_image) embeddings of ``n`` PIL images or uint8 (H, W, 3) arrays."""


class OpenClipEmbedder(Embedder):
    """open_clip CLIP (ViT-B/32 by default): text and image embeddings in CLIP's joint space."""

    def __init__(self, metric, model_name: str = "ViT-B-32"):
        """``metric``: a :class:`personalize.metrics.ClipMetric` (its model, preprocess and tokenizer)."""
        self.metric = metric
        self.name = f"open_clip:{model_name}"
        self._fingerprint: Optional[str] = None

    @classmethod
    def load(cls, weights: Optional[str] = None, model_name: str = "ViT-B-32", device=None) -> "OpenClipEmbedder":
        """``weights``: a local open_clip checkpoint or a folder holding one (``--clip-weights``), or None for
        OpenAI's ViT-B/32 from the Hugging Face cache or hub; offline without them a clear
        ``MetricWeightsError`` says what is missing."""
        from personalize.metrics import ClipMetric

        return cls(ClipMetric.load(weights, model_name=model_name, device=device), model_name)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.metric.model)
        return self._fingerprint

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.metric.embed_texts(list(texts))

    def embed_images(self, images: Sequence) -> torch.Tensor:
        return self.metric.embed_images(list(images))


class ToyEmbedder(Embedder):
    """The toy world's embedder: captions through the shipped toy model's text encoder, images through
    the toy world's identity judge (``Judges.load().embed``).

    ``pooling`` turns a caption's tokens (start and end tokens left out) into one vector:
    ``"tokens"`` (default) averages the text encoder's input token embeddings; ``"mean"`` averages its
    last hidden states; ``"pooled"`` is its pooled output (the end token's final hidden state)."""

    POOLINGS = ("tokens", "mean", "pooled")

    def __init__(self, model_path: str | Path | None = None, judges=None, pooling: str = "tokens",
                 batch_size: int = 256):
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        from personalize.toyworld.judge import Judges
        from personalize.models.toy import toy_model_path

        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling: unknown {pooling!r}; choose from {', '.join(self.POOLINGS)}")
        self.pooling, self.batch_size = pooling, batch_size
        self.name = f"toy:text-{pooling}+identity"
        self.model_path = Path(model_path) if model_path else toy_model_path()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no progress bar for 68 tensors
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.model_path, subfolder="text_encoder",
                                                              torch_dtype=torch.float32).eval()
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.judges = judges if judges is not None else Judges.load()
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            tokenizer_files = sorted((self.model_path / "tokenizer").iterdir())
            self._fingerprint = state_fingerprint(
                self.pooling, *(f.name.encode() + f.read_bytes() for f in tokenizer_files if f.is_file()),
                self.text_encoder, self.judges.identity)
        return self._fingerprint

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, not one string")
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length",
                                   max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            if self.pooling == "pooled":
                out.append(self.text_encoder(**batch).pooler_output)
                continue
            mask = batch.attention_mask.clone().float()
            mask[:, 0] = 0  # the start token
            mask[torch.arange(len(mask)), batch.attention_mask.sum(1) - 1] = 0  # the end token
            if self.pooling == "tokens":
                hidden = self.text_encoder.get_input_embeddings()(batch.input_ids)
            else:
                hidden = self.text_encoder(**batch).last_hidden_state
            out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
        return torch.cat(out).float() if out else torch.zeros(0, self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        from personalize.metrics import as_pil
        from personalize.toyworld.judge import to_tensor

        # one at a time into 64x64 tensors: a collection's images need not share a size
        pixels = torch.cat([to_tensor(np.array(as_pil(image))) for image in images])
        return self.judges.embed(pixels)


def embedder_for(name: str, clip_weights: Optional[str] = None, device=None) -> Embedder:
    """The embedder an index's ``index.json`` names, built with default weights (``clip_weights`` for CLIP)."""
    if name.startswith("toy:text-") and name.endswith("+identity"):
        pooling = name[len("toy:text-"):-len("+identity")]
        if pooling not in ToyEmbedder.POOLINGS:
            raise RetrievalError(f"no built-in embedder is called {name!r} (toy pooling {pooling!r}: choose from "
                                 f"{', '.join(ToyEmbedder.POOLINGS)})")
        return ToyEmbedder(pooling=pooling)
    if name.startswith("open_clip:"):
        return OpenClipEmbedder.load(clip_weights, model_name=name.split(":", 1)[1], device=device)
    raise RetrievalError(f"no built-in embedder is called {name!r}; pass the embedder the index was built with")
