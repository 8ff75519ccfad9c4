"""Benchmark settings and plan: the parts, methods and variations, :class:`BenchSettings` (steps,
resolutions and passes per part and device) and :func:`plan_cases`, the configurations of parts A and B
with their config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent.parent
PARTS = ("tiny", "sd15", "sdxl", "overhead")
METHODS = ("lora", "dreambooth", "textual_inversion", "text2image")
VARIATIONS = ("baseline", "cache", "grad_ckpt", "adamw8bit")
TINY_RECIPES = {"lora": "tiny/lora", "dreambooth": "tiny/dreambooth",
                "textual_inversion": "tiny/textual-inversion", "text2image": "tiny/text2image"}
VARIATION_LABELS = {"baseline": "baseline", "cache": "+ cache", "grad_ckpt": "+ gradient checkpointing",
                    "adamw8bit": "+ 8-bit AdamW"}


@dataclass
class BenchSettings:
    device: str = "cpu"                      # cpu | cuda
    only: Optional[list[str]] = None         # subset of PARTS; default: tiny, sd15, overhead (+ sdxl on cuda)
    quick: bool = False
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    variations: list[str] = field(default_factory=lambda: list(VARIATIONS))
    tiny_resolution: int = 64
    resolution: Optional[int] = None         # SD-sized models; default 64 on CPU, 512 (sd15) / 1024 (sdxl) on CUDA
    steps: Optional[int] = None              # timed steps per configuration (default per part)
    warmup: Optional[int] = None             # warm-up steps per configuration, excluded from timing
    repeats: Optional[int] = None            # passes over the configurations of A and B (default 2 on CPU, else 1)
    mixed_precision: Optional[str] = None    # default: no on CPU, bf16 on CUDA
    overhead_rounds: Optional[int] = None    # interleaved timing rounds of part C
    overhead_window: Optional[int] = None    # steps per timing window of part C
    overhead_base: str = "tiny-sd"           # model of part C: tiny-sd or sd15
    work_dir: Optional[str] = None           # temporary runs and models (default: a fresh temp folder)
    model_dir: Optional[str] = None          # keep / reuse the random SD-sized pipelines here
    threads: Optional[int] = None            # torch CPU threads per worker (default: torch's, = usable cores)
    isolate: bool = True                     # one fresh subprocess per configuration (needed for memory)
    case_timeout: int = 1800
    output: Optional[str] = "docs/benchmarks.md"
    command: str = ""

    def passes(self) -> int:
        return self.repeats if self.repeats is not None else (1 if self.quick or self.cuda else 2)

    def parts(self) -> list[str]:
        if self.only:
            return [p for p in PARTS if p in self.only]
        return [p for p in PARTS if p != "sdxl" or self.device == "cuda"]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def precision(self) -> str:
        return self.mixed_precision or ("bf16" if self.cuda else "no")

    def _or(self, warmup: int, steps: int) -> tuple[int, int]:
        return (warmup if self.warmup is None else self.warmup), (steps if self.steps is None else self.steps)

    def tiny_steps(self) -> tuple[int, int]:
        return self._or(2 if self.quick else 3, 8 if self.quick else 20)

    def sd_steps(self, model: str) -> tuple[int, int]:
        if self.cuda:
            return self._or(3, 5 if self.quick else (20 if model == "sd15" else 10))
        return self._or(1, 1 if self.quick else 2)

    def sd_resolution(self, model: str) -> int:
        if self.resolution:
            return self.resolution
        return (512 if model == "sd15" else 1024) if self.cuda else 64

    def overhead_plan(self) -> tuple[int, int, int]:
        """(warm-up steps, rounds, steps per window)."""
        sd = self.overhead_base != "tiny-sd"
        rounds = self.overhead_rounds or (3 if sd and not self.cuda else (12 if self.quick else 40))
        window = self.overhead_window or 1
        return (1 if sd and not self.cuda else 3), rounds, window


def _data_overrides(recipe: str, resolution: int) -> list[str]:
    """Absolute data paths (workers may run anywhere) and no minimum image size at large resolutions."""
    out = [f"data.resolution={resolution}", "data.min_image_size=8"]
    if recipe == "tiny/text2image":
        out.append(f"data.metadata={ROOT / 'recipes/tiny/captions.jsonl'}")
    else:
        out.append(f"data.instance_images={ROOT / 'recipes/tiny/subject'}")
    return out


def _variation_overrides(variation: str) -> list[str]:
    return {"baseline": [], "cache": ["data.cache=true"], "grad_ckpt": ["train.gradient_checkpointing=true"],
            "adamw8bit": ["train.optimizer=adamw8bit"]}[variation]


def plan_cases(settings: BenchSettings, work: Path) -> list[dict]:
    """The configurations of parts A and B, each a JSON-able spec for :func:`measure_case`."""
    cases = []
    common = [f"train.mixed_precision='{settings.precision()}'", "train.report_to=none", "train.progress_bar=false",
              "train.checkpoint_every=0", "validation.prompts=[]"]
    parts = settings.parts()
    if "tiny" in parts:
        warmup, steps = settings.tiny_steps()
        for method in settings.methods:
            recipe = TINY_RECIPES[method]
            variations = settings.variations if not settings.quick or method == "lora" else ["baseline"]
            for variation in variations:
                overrides = [*common, *_data_overrides(recipe, settings.tiny_resolution),
                             *_variation_overrides(variation)]
                if method == "dreambooth":
                    overrides.append(f"prior.class_images={work / 'class-images'}")
                cases.append(dict(part="tiny", model="tiny-sd", method=method, variation=variation, recipe=recipe,
                                  overrides=overrides, warmup=warmup, steps=steps, device=settings.device,
                                  resolution=settings.tiny_resolution, label=f"tiny-{method}-{variation}"))
    for model in ("sd15", "sdxl"):
        if model not in parts:
            continue
        warmup, steps = settings.sd_steps(model)
        resolution = settings.sd_resolution(model)
        if settings.cuda:  # 8-bit Adam + gradient checkpointing, as one trains these models on one GPU
            variants = [("8-bit AdamW + grad ckpt", False, True, "adamw8bit"),
                        ("8-bit AdamW + grad ckpt", True, True, "adamw8bit"),
                        ("AdamW", True, False, "adamw")]
        else:
            variants = [("AdamW", False, False, "adamw"), ("AdamW", True, False, "adamw")]
        for name, cache, ckpt, optimizer in variants:
            overrides = [*common, *_data_overrides("tiny/lora", resolution), "train.batch_size=1",
                         f"data.cache={str(cache).lower()}", f"train.gradient_checkpointing={str(ckpt).lower()}",
                         f"train.optimizer={optimizer}", "lora.rank=16", "lora.alpha=16", "train.learning_rate=1e-4"]
            cases.append(dict(part=model, model=model, method="lora", variation=name, cache=cache, recipe="tiny/lora",
                              overrides=overrides, warmup=warmup, steps=steps, device=settings.device,
                              resolution=resolution, label=f"{model}-lora-{'cache' if cache else 'nocache'}-{optimizer}"
                                                           f"{'-ckpt' if ckpt else ''}"))
    return cases
