"""DreamBench's metrics (DINO, CLIP-I, CLIP-T) and ToyBench's judges behind one small interface.

As in the DreamBooth paper (Ruiz et al. 2022, section 4.1):

- **DINO**: cosine similarity of DINO ViT-S/16 global embeddings (the class token of the last layer),
  averaged over every (generated, real) pair of one subject;
- **CLIP-I**: the same with CLIP ViT-B/32 image embeddings;
- **CLIP-T**: cosine similarity of each generated image's CLIP embedding with its prompt's CLIP text
  embedding, the prompt written with the class noun and without the unique token.

Preprocessing is the reference implementations': DINO's evaluation transform (resize the short side to
256 bicubic, center crop 224, ImageNet mean/std) and open_clip's for the OpenAI weights (resize 224
bicubic, center crop 224, CLIP mean/std).

A :class:`SubjectMetrics` answers ``image_similarity(generated, references)`` and
``text_similarity(images, prompts)``; each names the column it fills (``image_metric``,
``text_metric``) and the weights it scores with (``describe()``, stored with every result).

Weights are read from safetensors; a pickled checkpoint (``.bin``, ``.pt``: loading one can run code)
is refused unless the user trusts it with ``allow_pickle`` (``--allow-pickle``), and is then read with
``torch.load(weights_only=True)``. :class:`personalize.metrics.toy.ToyJudgeMetrics` puts ToyBench's judges
behind the same interface, so one harness scores DreamBench and the toy world.
"""

from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from personalize.errors import ModelLoadError
from personalize.utils.tensors import pairwise_cosine  # noqa: F401  (part of the metrics' interface)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

DINO_REPO = "facebook/dino-vits16"
CLIP_MODEL = "ViT-B-32"
CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip keeps the OpenAI ViT-B/32 weights
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DISPLAY_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                 "subject_fidelity": "subject fidelity", "prompt_fidelity": "prompt fidelity"}


class MetricWeightsError(ModelLoadError):
    """A metric's weights are missing or unreadable; the message says which and how to supply them."""


# -- the interface --------------------------------------------------------------------------------

def copy_paste_rate(generated: Sequence, references: Sequence, psnr_db: float = 20.0, size: int = 32) -> float:
    """The fraction of generated images that are near-duplicates of a reference (SuTI's copy-paste
    failure): PSNR >= ``psnr_db`` against some reference (or its mirror image), both resized to ``size``
    px. A subject shown in a new context differs from every reference in its background, so it scores
    far below; a copy of a reference scores far above."""
    def pixels(images):
        return torch.stack([torch.from_numpy(np.asarray(as_pil(i).resize((size, size), Image.Resampling.BOX),
                                                        dtype=np.float32)) for i in images])

    gen, refs = pixels(generated), pixels(references)
    refs = torch.cat([refs, refs.flip(2)])  # mirrored references too (training and sampling may flip)
    mse = ((gen[:, None] - refs[None]) ** 2).flatten(2).mean(-1)  # (generated, references)
    psnr = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
    return float((psnr.max(dim=1).values >= psnr_db).float().mean())


def as_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a path or uint8 pixels (H, W, 3)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        from personalize.data.images import load_image
        return load_image(image)
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


class SubjectMetrics(ABC):
    """Scores one subject's generated images. A subclass fills ``image_metric`` (subject fidelity,
    e.g. "dino") and/or ``text_metric`` (prompt fidelity, e.g. "clip_t") and overrides what it offers;
    embedding metrics only need ``embed_images`` (and ``embed_texts``)."""

    image_metric: Optional[str] = None
    text_metric: Optional[str] = None
    weights: Optional[str] = None  # what the metric scores with (a file, a folder, "tiny random"), for the record

    @property
    def names(self) -> list[str]:
        return [n for n in (self.image_metric, self.text_metric) if n]

    def describe(self) -> dict:
        """What the scores depend on: the metric, its columns and its weights (stored with each result)."""
        return {"metric": type(self).__name__, "columns": self.names, "weights": self.weights}

    def embed_images(self, images: Sequence) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not embed images")

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not embed text")

    def image_similarity(self, generated: Sequence, references: Sequence) -> float:
        """Mean cosine over every (generated, reference) pair."""
        return pairwise_cosine(self.embed_images(generated), self.embed_images(references))

    def reference_similarity(self, references: Sequence) -> float:
        """The real-images ceiling: mean cosine over pairs of *distinct* references of the subject."""
        return pairwise_cosine(*[self.embed_images(references)] * 2, exclude_self=True)

    def text_similarity(self, images: Sequence, prompts: Sequence | str) -> float:
        """Mean cosine of each image with its prompt (one prompt for all, or one per image)."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        image_emb = F.normalize(self.embed_images(images).double(), dim=-1)
        text_emb = F.normalize(self.embed_texts(prompts).double(), dim=-1)
        return float((image_emb * text_emb).sum(-1).mean())

    def score(self, generated: Sequence, references: Sequence, prompt) -> dict[str, float]:
        """This metric's columns for one prompt's images."""
        out = {}
        if self.image_metric:
            out[self.image_metric] = self.image_similarity(generated, references)
        if self.text_metric:
            out[self.text_metric] = self.text_similarity(generated, prompt)
        return out


def metric_names(metrics: Sequence[SubjectMetrics]) -> list[str]:
    return [name for m in metrics for name in m.names]
