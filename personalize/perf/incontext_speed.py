"""Speed of in-context generation against fine-tuning, on one machine in one run.

- *photos to 4 images*: from a subject's reference files to 4 generated images. In-context: encode the
  references and sample. Fine-tuning (DreamBooth, LoRA with their ToyBench recipes): train, load the
  result into a stock diffusers pipeline, sample. Model loading before the clock starts is the same
  for all and reported apart.
- *reference attention overhead*: the same sampling loop (same batch, same number of U-Net calls) with
  the reference features attended to, against the loop with the reference layers skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def incontext_photos_to_images(pipe, references: list[Path], captions: list[str], prompt: str, n: int = 4,
                               steps: int = 25, bf16: bool = False) -> float:
    seconds, _ = _seconds(lambda: pipe(prompt, references, captions, num_images=n, steps=steps, bf16=bf16))
    return seconds


def finetune_photos_to_images(recipe: str, references: Path, class_noun: str, prompt: str, out_dir: Path,
                              n: int = 4, steps: int = 25, base: Optional[str] = None) -> dict:
    """Train ``recipe`` on the references (as ToyBench does), then generate ``n`` images."""
    from personalize.evaluation.subjects import BenchSubject, EvalPrompt
    from personalize.evaluation.settings import EvalSettings
    from personalize.evaluation.rows import FineTuneRow

    subject = BenchSubject("speed", class_noun, sorted(references.glob("*.png")),
                           [EvalPrompt(0, prompt.replace(class_noun, "{}", 1), "recontextualization")])
    settings = EvalSettings(out=str(out_dir), images_per_prompt=n, steps=steps, guidance=4.0, batch_size=n)
    row = FineTuneRow(recipe, [f"model.base={base}"] if base else [], label=Path(recipe).stem)
    work = out_dir / row.label
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    train_s, _ = _seconds(lambda: row.prepare(subject, work, settings, lambda m: None))
    generate_s, _ = _seconds(lambda: row.generate(subject, work, settings))
    row.cleanup(work, settings)
    return {"train_seconds": train_s, "generate_seconds": generate_s, "total_seconds": train_s + generate_s}


@torch.no_grad()
def reference_attention_overhead(pipe, references: list[Path], captions: list[str], prompt: str, n: int = 4,
                                 steps: int = 25, repeats: int = 3) -> dict:
    """Median seconds of the sampling loop's U-Net calls with and without the reference branch."""
    from personalize.incontext.attention import ReferenceFeatures
    from personalize.incontext.model import predict_noise
    from personalize.incontext.pipeline import load_references

    images, caps = load_references(references, captions, pipe.spec, allow_more=True)
    features = pipe.encode_references(images, caps)
    unet = pipe.models.unet
    size = pipe.resolution // pipe.vae_scale
    latents = torch.randn(3 * n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    text = pipe._conditioning([""] * n + [prompt] * (2 * n))
    mask = torch.cat([torch.zeros(2 * n), torch.ones(n)])
    reference = ReferenceFeatures({k: v.expand(n, -1, -1) for k, v in features.tokens.items()}).repeat(3, mask)
    t = torch.full((3 * n,), 500)

    @torch.no_grad()  # as the pipeline samples
    def loop(ref):
        for _ in range(steps):
            predict_noise(unet, latents, t, text, ref)

    loop(reference)  # warm up
    timings = {"with": [], "without": []}
    for _ in range(repeats):  # interleaved, so drifts of the machine hit both alike
        timings["with"].append(_seconds(lambda: loop(reference))[0])
        timings["without"].append(_seconds(lambda: loop(None))[0])
    med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    return {"with_reference_s": med["with"], "without_reference_s": med["without"],
            "ratio": med["with"] / med["without"], "repeats": repeats, "steps": steps, "batch": 3 * n}
