"""Measure the toy base model and ship it: VAE reconstruction PSNR on held-out renders, prompt read-back
by the attribute judge on random captions (with real renders of the same captions as the ceiling),
the fp16 copy in ``personalize/toyworld/assets/toy-model`` and its model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from personalize.toyworld.model import TOY_MODEL_DIR, vae_psnr
from personalize.toyworld.world import render, sample_spec


def ship(source: Path, target: Path = TOY_MODEL_DIR) -> Path:
    """Copy a trained pipeline folder to ``target`` with every weight stored in fp16 safetensors."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def prompt_readback(pipe, judges, n: int = 200, seed: int = 777, steps: int = 25, guidance: float = 4.0) -> dict:
    """Generate one image for each of ``n`` random captions; the fraction whose class / color / scene the
    attribute judge reads as captioned, and the same on real renders of the captions (the ceiling)."""
    from personalize.toyworld.toybench import generate
    from personalize.toyworld.world import caption

    rng = np.random.default_rng([7, seed])
    specs = [sample_spec(rng, None, p_no_scene=0.0, p_accessory=0.3) for _ in range(n)]
    generated = np.stack(generate(pipe, [caption(s) for s in specs], 1, seed=seed, steps=steps, guidance=guidance))
    real = np.stack([render(s) for s in specs])
    out = {}
    for name, images in (("generated", generated), ("real renders", real)):
        read = judges.attributes(images)
        out[name] = {key: float(np.mean([r[key] == getattr(s, attr) for r, s in zip(read, specs)]))
                     for key, attr in (("class", "cls"), ("color", "color"), ("scene", "scene"))}
        with_acc = [(r, s) for r, s in zip(read, specs) if s.accessory]
        out[name]["accessory"] = float(np.mean([r["accessory"] == s.accessory for r, s in with_acc]))
    return {"captions": n, **out, "images": generated}


def measure(model_dir: Path, n_captions: int = 200) -> dict:
    from diffusers import StableDiffusionPipeline

    from personalize.toyworld.judge import Judges

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    psnr, _, _ = vae_psnr(pipe.vae, n=256)
    start = time.perf_counter()
    readback = prompt_readback(pipe, Judges.load(), n=n_captions)
    readback.pop("images")
    return {"vae_psnr_db": {"mean": float(psnr.mean()), "median": float(np.median(psnr)), "min": float(psnr.min()),
                            "images": len(psnr)},
            "prompt_readback": readback, "readback_seconds": time.perf_counter() - start,
            "size_mb": sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 2**20}
