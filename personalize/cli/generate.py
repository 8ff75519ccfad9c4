"""The ``personalize generate`` command (the sampling itself is :mod:`personalize.sampling`).

    personalize generate --base tiny-sd --lora outputs/tiny-lora --prompt "a photo of sks toy" -n 4

Everything is checked before the model loads: the numbers (``-n``, ``--steps``, ``--resolution``, ...),
the ``--lora`` / ``--embeddings`` files (they exist, are safetensors, or a pickle with ``--allow-pickle``,
and can be read) and ``--out`` (not a file, writable, holding none of the inputs, no finished run unless
``--overwrite``, and none of the files this command writes unless an earlier generate run wrote them).
Then the model loads; a LoRA or embedding made for another model (SDXL on SD 1.x, or the reverse) and a
token the tokenizer already has are refused; the images are generated and written, then a manifest,
``generate.json``, of what was written with the prompt and settings. ``--overwrite`` removes only the
files the previous manifest lists, so no stale image of a larger earlier run stays beside the new ones.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from personalize.sampling import adapt, image_grid, read_inputs, render

if TYPE_CHECKING:
    from PIL import Image

MANIFEST = "generate.json"  # written last: the files of a finished run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model (tiny-sd, a hub id, a folder, a .safetensors file), "
                                                 "or a DreamBooth output folder")
    p.add_argument("--lora", help="a LoRA file, or the folder with pytorch_lora_weights.safetensors (diffusers or "
                                  "kohya keys)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--embeddings", help="learned_embeds.safetensors (Textual Inversion) or its folder")
    p.add_argument("--token", help="token for the embeddings (default: the one stored in the file)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("-n", type=int, default=4, help="images")
    p.add_argument("--seed", type=int, default=0, help="image j uses seed SEED+j")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, default=512, help="image side, a multiple of 8")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust pickled files (--base checkpoints, --lora / --embeddings .bin or .pt): loading a "
                        "pickle can run code. Default: safetensors only")
    p.add_argument("--out", default="outputs/generated", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace a finished generate run in --out (only the files its {MANIFEST} lists are removed)")


def check_options(args) -> None:
    """The numbers and option combinations, refused before anything is read."""
    from personalize.errors import ConfigError

    for option, value in (("-n", args.n), ("--steps", args.steps)):
        if value < 1:
            raise ConfigError(f"{option}: must be at least 1, got {value}")
    if args.resolution < 8 or args.resolution % 8:
        raise ConfigError(f"--resolution: must be a positive multiple of 8 (the VAE's downsampling), "
                          f"got {args.resolution}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed: must be between 0 and 2**63 - 1, got {args.seed}")
    for option, value in (("--guidance", args.guidance), ("--lora-scale", args.lora_scale)):
        if not math.isfinite(value):
            raise ConfigError(f"{option}: must be a finite number, got {value}")
    if not args.prompt.strip():
        raise ConfigError("--prompt: empty; say what to generate")
    if args.lora_scale != 1.0 and not args.lora:
        raise ConfigError("--lora-scale: only with --lora")
    if args.token is not None and not args.embeddings:
        raise ConfigError("--token: only with --embeddings (the token names the embedding in prompts)")




def planned_files(n: int) -> list[str]:
    """The files a run writes into --out (the manifest last, not listed)."""
    return [f"{i:03d}.png" for i in range(n)] + ["grid.png"]




def write_images(out: Path, images: list[Image.Image]) -> list[Path]:
    """The images and their grid, each atomically; on an error the files written so far are removed."""
    from personalize.utils.files import save_image

    written: list[Path] = []
    try:
        for i, image in enumerate(images):
            written.append(save_image(image, out / f"{i:03d}.png"))
        written.append(save_image(image_grid(images, rows=1), out / "grid.png"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _cli_wording(message: str) -> str:
    """The model loader names recipe keys; this command's options are flags."""
    for key, flag in (("model.allow_pickle=true", "--allow-pickle"), ("model.allow_pickle: true", "--allow-pickle"),
                      ("model.base", "--base")):
        message = message.replace(key, flag)
    return message


def run(args) -> int:
    from personalize.config import ModelConfig
    from personalize.errors import ModelLoadError
    from personalize.models import load_models
    from personalize.utils.device import resolve_device
    from personalize.utils.output_dir import OutputFolder

    check_options(args)
    lora, embeddings = read_inputs(args.lora, args.embeddings, args.allow_pickle)
    base_path = Path(args.base).expanduser()
    inputs = {"--base": [base_path] if base_path.exists() else [], "--lora": [lora[0]] if lora else [],
              "--embeddings": [embeddings[0]] if embeddings else []}
    folder = OutputFolder(args.out, "--out", finished=MANIFEST, overwrite=args.overwrite, inputs=inputs)
    names = planned_files(args.n)
    folder.check()
    folder.refuse_foreign(names, "generate")
    device = resolve_device(args.device)
    try:
        pipe = load_models(ModelConfig(base=args.base, allow_pickle=args.allow_pickle)).pipeline()
    except ModelLoadError as err:
        raise ModelLoadError(_cli_wording(str(err))) from None
    tokens = adapt(pipe, lora, embeddings, args.token, base=f"--base {args.base}")
    if lora and args.lora_scale != 1.0:
        pipe.fuse_lora(lora_scale=args.lora_scale)
    with folder.claim():
        folder.refuse_foreign(names, "generate")  # again, under the lock
        images = render(None, [args.prompt], args.n, args.steps, args.guidance, args.seed, args.resolution,
                        negative_prompt=args.negative_prompt, device=device, pipeline=pipe)
        folder.remove_previous()
        written = write_images(folder.path, images)
        folder.write_manifest(written, command="generate", base=args.base, lora=str(lora[0]) if lora else None,
                              lora_scale=args.lora_scale, embeddings=str(embeddings[0]) if embeddings else None,
                              tokens=tokens, prompt=args.prompt, negative_prompt=args.negative_prompt, n=args.n,
                              seed=args.seed, steps=args.steps, guidance=args.guidance, resolution=args.resolution)
    print(f"wrote {len(images)} images and grid.png to {folder.path} ({MANIFEST} lists them)")
    return 0
