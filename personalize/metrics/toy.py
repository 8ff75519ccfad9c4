"""ToyBench's judges behind the harness's metric interface (:class:`personalize.metrics.SubjectMetrics`):
subject fidelity from the identity embedding, prompt fidelity from the attribute judge."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch

from personalize.metrics.base import MetricWeightsError, SubjectMetrics, as_pil


def toy_prompt_attributes(prompt: str) -> dict[str, str]:
    """What a toy-world prompt (class noun, no unique token) asks for: its ``class``, and ``color``,
    ``scene``, ``accessory`` where it names one ("a purple star", "a star in the snow",
    "a star wearing a santa hat"). The color is a color word before the class noun."""
    from personalize.toyworld.world import ACCESSORIES, CLASSES, COLORS, SCENES

    text = " ".join(prompt.lower().split())
    asked = {}
    cls = next((c for c in CLASSES if re.search(rf"\b{c}\b", text)), None)
    if cls:
        asked["class"] = cls
        before = text[:re.search(rf"\b{cls}\b", text).start()].split()
        color = next((w for w in reversed(before) if w in COLORS), None)
        if color:
            asked["color"] = color
    scenes = [(len(words), name) for name, words in SCENES.items() if words in text]
    if scenes:
        asked["scene"] = max(scenes)[1]
    wearing = text.split(" wearing ", 1)[1] if " wearing " in text else ""
    accessories = [(len(words), name) for name, words in ACCESSORIES.items() if wearing.startswith(words)]
    if accessories:
        asked["accessory"] = max(accessories)[1]
    return asked


class ToyJudgeMetrics(SubjectMetrics):
    """ToyBench's judges (``personalize.toyworld.judge.Judges``) as a :class:`SubjectMetrics`:
    subject fidelity = identity-embedding cosine over (generated, reference) pairs, as DINO;
    prompt fidelity = the fraction of images that show what their prompt asks.

    ``text_similarity`` takes prompt texts (it checks what the text names: class, and color, scene or
    accessory where named) or toy-world ``ImageSpec`` targets (then exactly ``Judges.prompt_fidelity``,
    which also checks the subject's own color where the prompt asks no other, as ToyBench does)."""

    image_metric, text_metric = "subject_fidelity", "prompt_fidelity"

    def __init__(self, judges):
        self.judges = judges

    @classmethod
    def load(cls, path: Optional[str] = None) -> "ToyJudgeMetrics":
        """The judges in ``path`` (``--judges``; default the shipped ones), named in the record by file and
        content digest."""
        import hashlib
        from pathlib import Path

        from personalize.errors import ModelLoadError
        from personalize.toyworld.judge import Judges
        from personalize.models.toy import TOY_JUDGES

        try:
            metric = cls(Judges.load(path))
        except (FileNotFoundError, ModelLoadError) as err:
            raise MetricWeightsError(f"--judges: {err}") from None
        file = Path(path or TOY_JUDGES)
        metric.weights = f"{file.name}:{hashlib.sha256(file.read_bytes()).hexdigest()[:16]}"
        return metric

    @staticmethod
    def _pixels(images: Sequence) -> list[np.ndarray]:
        return [np.asarray(as_pil(im)) for im in images]

    def embed_images(self, images: Sequence) -> torch.Tensor:
        return self.judges.embed(self._pixels(images))

    def image_similarity(self, generated: Sequence, references: Sequence) -> float:
        return float(self.judges.subject_fidelity(self._pixels(generated), self._pixels(references)))

    def text_similarity(self, images: Sequence, prompts) -> float:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in prompts):  # ImageSpec targets
            return float(self.judges.prompt_fidelity(self._pixels(images), prompts))
        predicted = self.judges.attributes(self._pixels(images))
        asked = [toy_prompt_attributes(p) for p in prompts]
        return float(np.mean([all(seen.get(k) == v for k, v in want.items()) for seen, want in zip(predicted, asked)]))
