"""Random-weight SD 1.5 / SDXL pipelines of the real architectures (:func:`sd15_configs`,
:func:`sdxl_configs`, :func:`build_random_model`) and the workers: :func:`worker_main` (the entry point of
``python -m personalize.perf --worker SPEC``), :func:`run_worker` (one spec in a fresh subprocess or in
this process) and the torch thread setting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from personalize.perf.cases import ROOT, BenchSettings
from personalize.perf.measure import measure_case, measure_overhead

RESULT_MARK = "BENCH_RESULT "


def sd15_configs() -> dict:
    return {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             hidden_act="quick_gelu", projection_dim=768, vocab_size=49408,
                             max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    }


def sdxl_configs() -> dict:
    return {
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                     attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816, norm_num_groups=32),
        "vae": dict(sd15_configs()["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": sd15_configs()["text_encoder"],
        "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                               hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77,
                               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    }


def build_random_model(spec: dict) -> dict:
    """Save a random-weight pipeline of SD 1.5's (or SDXL's) architecture to ``spec['out_dir']``."""
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from personalize.models.tokenizer import build_clip_tokenizer

    model, out_dir = spec["model"], Path(spec["out_dir"])
    marker = out_dir / "bench_model.json"
    if marker.is_file():
        return dict(json.loads(marker.read_text()), reused=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = sd15_configs() if model == "sd15" else sdxl_configs()
    build_device = "cuda" if spec["device"] == "cuda" else "cpu"  # random init is much faster on a GPU
    with torch.random.fork_rng(devices=[]), torch.device(build_device):
        torch.manual_seed(0)
        parts = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))}
        if model == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(**parts, tokenizer=build_clip_tokenizer(), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    info = {"model": model, "params": counts, "build_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info))
    return dict(info, reused=False)


WORKERS: dict[str, Callable[[dict], dict]] = {"case": measure_case, "overhead": measure_overhead,
                                              "build": build_random_model}


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    set_threads(spec.get("threads"))
    result = WORKERS[spec["kind"]](spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_worker(spec: dict, settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Run ``spec`` in a fresh Python process (or in this one when ``settings.isolate`` is false)."""
    spec = dict(spec, threads=settings.threads)
    if not settings.isolate:
        return WORKERS[spec["kind"]](spec)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["device"] != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark stays on the CPU
    if settings.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)
    proc = subprocess.run([sys.executable, "-m", "personalize.perf", "--worker", json.dumps(spec)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=settings.case_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"benchmark worker {spec.get('label', spec['kind'])} failed (exit {proc.returncode}):\n{tail}")
