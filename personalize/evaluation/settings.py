"""The settings of one benchmark run (:class:`EvalSettings`): generation, in-context guidance, training
rows' options and output; checked before anything loads, naming the command-line option."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from personalize.errors import ConfigError
from personalize.utils.device import resolve_device


@dataclass
class EvalSettings:
    out: str = "outputs/eval"
    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    ref_guidance: Optional[float] = None  # in-context rows: the reference guidance scale (guidance is the text
    #                                       scale); None: each model's own (its config's ref_scale)
    bf16: bool = False  # in-context rows: sample under bfloat16 autocast
    ref_interval: Optional[tuple[float, float]] = None  # in-context rows: reference guidance only at t/T in it
    references: int = 0  # in-context rows: use this many of a subject's references (0: as many as the model
    #                      was trained with; more is allowed, as the fine-tuning rows train on all of them)
    batch_size: int = 8
    resolution: Optional[int] = None  # default: the recipe's data.resolution (zero-shot rows: the model's own)
    token: str = "sks"  # DreamBooth / LoRA's unique identifier; Textual Inversion uses its placeholder
    keep_weights: bool = False
    device: Optional[str] = None
    title: str = "DreamBench"
    class_images_suffix: str = ""  # set per process when several share the subjects (their own class images)
    drift_images: int = 0  # > 0: also this many images of the bare class prompt "a {class}" (language drift)
    caption_references: bool = False  # fine-tune rows train on the references' own captions (subject named)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def check(self) -> "EvalSettings":
        """Refuse settings no run can use, naming the command-line option (:class:`ConfigError`)."""
        def need(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{option}: {message}")

        need(self.images_per_prompt >= 1, "-n/--images-per-prompt",
             f"give 1 or more images per prompt (got {self.images_per_prompt})")
        need(self.steps >= 1, "--steps", f"give 1 or more sampling steps (got {self.steps})")
        need(self.batch_size >= 1, "--batch-size", f"give 1 or more images per pipeline call (got {self.batch_size})")
        need(self.drift_images == 0 or self.drift_images >= 2, "--drift-images",
             f"give 0 (off) or 2 or more images (they are also compared among themselves; got {self.drift_images})")
        need(self.references >= 0, "--references", f"give 0 (the model's own count) or more (got {self.references})")
        need(self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0), "--resolution",
             f"give a positive multiple of 8 (got {self.resolution})")
        need(math.isfinite(self.guidance), "--guidance", f"give a finite number (got {self.guidance})")
        need(self.ref_guidance is None or math.isfinite(self.ref_guidance), "--ref-guidance",
             f"give a finite number (got {self.ref_guidance})")
        resolve_device(self.device)
        return self
