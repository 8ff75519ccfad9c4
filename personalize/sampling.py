"""Sampling, for every caller (validation images, the harness, ``personalize generate``): one seeded render
loop, image grids, and a stock diffusers pipeline built from a base model plus a LoRA or Textual Inversion
file (checked, and a pickle only when allowed) or a DreamBooth output folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from PIL import Image

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    from PIL import Image

    cols = max(1, -(-len(images) // max(rows, 1)))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def render(models, prompts: list[str], num_images_per_prompt: int, steps: int, guidance_scale: float, seed: int,
           resolution: int, negative_prompt: Optional[str] = None, device=None, pipeline=None) -> list[Image.Image]:
    """Images for each prompt, in prompt order; image j of prompt i uses seed ``seed + j``."""
    import torch

    pipe = pipeline or models.pipeline()
    if device is not None:
        pipe = pipe.to(device)
    images = []
    with torch.no_grad():
        for prompt in prompts:
            for j in range(num_images_per_prompt):
                generator = torch.Generator().manual_seed(seed + j)
                images += pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                               guidance_scale=guidance_scale, height=resolution, width=resolution,
                               generator=generator).images
    return images


# -- weights files the user names ------------------------------------------------------------------
def weights_file(path: str | Path, option: str, names: tuple[str, ...], allow_pickle: bool,
                 pickle_option: str = "--allow-pickle") -> Path:
    """The file ``path`` names: itself, or in a folder the first of ``names`` there, else its only
    ``.safetensors`` file, else its only pickle. A pickle (.bin, .pt, ...) only with ``allow_pickle``."""
    from personalize.errors import DataError

    given = Path(path).expanduser()
    if not given.exists():
        raise DataError(f"{option}: {path} does not exist")
    file = given
    if given.is_dir():
        found = [given / n for n in names if (given / n).is_file()]
        candidates = found or sorted(given.glob("*.safetensors")) or sorted(
            p for p in given.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if not candidates:
            raise DataError(f"{option}: {path} holds no weights ({' or '.join(names)}); name the file to load")
        if not found and len(candidates) > 1:
            raise DataError(f"{option}: {path} holds several weights files ({', '.join(p.name for p in candidates)}); "
                            "name the one to load")
        file = candidates[0]
    if file.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise DataError(f"{option}: {file} is a pickle, and loading a pickle can execute arbitrary code. Convert "
                            f"it to .safetensors, or pass {pickle_option} if you trust its source")
    elif file.suffix != ".safetensors":
        raise DataError(f"{option}: {file} is not a .safetensors file")
    return file


def read_weights(file: Path, option: str) -> dict:
    """The tensors of ``file`` (a .safetensors file, or a pickle already allowed: read with
    ``torch.load(weights_only=True)``, so it can hold tensors and plain containers only)."""
    import torch

    from personalize.errors import DataError

    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise DataError(f"{option}: {file} is not a readable .safetensors file ({err})") from None
    else:
        import pickle

        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, OSError, ValueError, RuntimeError, EOFError) as err:
            raise DataError(f"{option}: {file} cannot be read as tensors ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not state:
        raise DataError(f"{option}: {file} holds no tensors")
    return state


def read_inputs(lora: Optional[str], embeddings: Optional[str], allow_pickle: bool):
    """``(file, tensors)`` of the ``--lora`` and of the ``--embeddings`` path (files or the folders the
    methods export), each None when not given; every problem with them is reported before a model loads."""
    from personalize.methods.lora import DIFFUSERS_FILE, KOHYA_FILE
    from personalize.methods.textual_inversion import EMBEDDINGS_FILE

    inputs = []
    for path, option, names in ((lora, "--lora", (DIFFUSERS_FILE, KOHYA_FILE)),
                                (embeddings, "--embeddings", (EMBEDDINGS_FILE, "learned_embeds.bin"))):
        file = weights_file(path, option, names, allow_pickle) if path else None
        inputs.append((file, read_weights(file, option)) if file else None)
    return tuple(inputs)


def adapt(pipe, lora, embeddings, token: Optional[str] = None, base: str = "the base model") -> list[str]:
    """Load the ``(file, tensors)`` of :func:`read_inputs` into ``pipe``; returns the embedding's tokens."""
    from personalize.methods.lora import load_lora
    from personalize.methods.textual_inversion import load_embeddings

    if lora:
        load_lora(pipe, *lora, base=base)
    return load_embeddings(pipe, *embeddings, token=token, base=base) if embeddings else []


def build_pipeline(base: str, lora: Optional[str] = None, embeddings: Optional[str] = None,
                   token: Optional[str] = None, allow_pickle: bool = False):
    """A stock diffusers pipeline: ``base`` (a model or a DreamBooth output folder) + LoRA / embeddings."""
    from personalize.config import ModelConfig
    from personalize.models import load_models

    lora_input, embeddings_input = read_inputs(lora, embeddings, allow_pickle)
    pipe = load_models(ModelConfig(base=base, allow_pickle=allow_pickle)).pipeline()
    adapt(pipe, lora_input, embeddings_input, token, base=f"--base {base}")
    return pipe


# -- the command -----------------------------------------------------------------------------------


def render_batched(pipe, texts: Sequence[str], n: int, steps: int, guidance: float, seed: int, batch_size: int,
                   resolution: Optional[int]) -> list[list[Image.Image]]:
    """``n`` images per prompt, ``batch_size`` per pipeline call, image ``j`` of every prompt with a CPU generator
    seeded ``seed + j`` (the same seeds for every method); ``resolution`` None = the pipeline's default."""
    import torch

    with torch.no_grad():
        jobs = [(i, text, seed + j) for i, text in enumerate(texts) for j in range(n)]
        images: list[list[Image.Image]] = [[] for _ in texts]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            out = pipe([t for _, t, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       height=resolution, width=resolution,
                       generator=[torch.Generator().manual_seed(s) for _, _, s in chunk]).images
            for (i, _, _), image in zip(chunk, out):
                images[i].append(image)
        return images
