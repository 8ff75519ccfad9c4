"""Training-throughput benchmarks of the trainer (``eval/bench_train.py`` is the command line).

Three parts, each written as markdown tables to ``docs/benchmarks.md``:

A. ``tiny``: steps/s and peak memory of every method on the built-in tiny model, a baseline per method
   plus one-factor variations (latent/text cache, gradient checkpointing, 8-bit AdamW).
B. ``sd15`` (and ``sdxl``): LoRA on a random-weight model of SD 1.5's (SDXL's) exact architecture,
   saved to a folder as a stock diffusers pipeline and loaded by the trainer like any local model;
   cache off vs on (the cache skips the VAE and the text encoder on every step).
C. ``overhead``: ``Trainer`` steps against a bare hand-written PyTorch loop doing the same math on the
   same modules and the same batch, interleaved in one process; the median of per-round ratios.

Every configuration of A and B runs in a fresh subprocess (``python -m personalize.bench --worker``),
so its peak memory (``ru_maxrss`` / ``VmHWM``; ``torch.cuda.max_memory_allocated`` on CUDA) is its own.
Warm-up steps are excluded from every timing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "BENCH_RESULT "
PARTS = ("tiny", "sd15", "sdxl", "overhead")
METHODS = ("lora", "dreambooth", "textual_inversion", "text2image")
VARIATIONS = ("baseline", "cache", "grad_ckpt", "adamw8bit")
TINY_RECIPES = {"lora": "tiny/lora", "dreambooth": "tiny/dreambooth",
                "textual_inversion": "tiny/textual-inversion", "text2image": "tiny/text2image"}
VARIATION_LABELS = {"baseline": "baseline", "cache": "+ cache", "grad_ckpt": "+ gradient checkpointing",
                    "adamw8bit": "+ 8-bit AdamW"}


# -------------------------------------------------------------------------------------------------
# settings and plan
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


# -------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc; elsewhere ru_maxrss only)
def _status_mib(key: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    rss = _status_mib("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so a later VmHWM is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmHWM") is not None
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------
# workers (run in a fresh subprocess, or in-process when isolate=False)
def _load(spec: dict, out_dir: Path, extra: list[str] = ()):
    from personalize.cli import resolve_recipe
    from personalize.config import load_config

    overrides = [*spec["overrides"], f"train.output_dir={out_dir}", *extra]
    if spec.get("base"):
        overrides.append(f"model.base={spec['base']}")
    return load_config(resolve_recipe(spec["recipe"]), overrides)


def measure_case(spec: dict) -> dict:
    """Train one configuration with ``Trainer.train()``; time the steps after warm-up, record memory."""
    import torch

    from personalize.trainer import Trainer

    cuda = spec["device"] == "cuda"
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    total = warmup + steps
    out_dir = Path(spec["work_dir"]) / "runs" / spec["label"]
    rss_start = _rss_mib()
    config = _load(spec, out_dir, [f"train.max_steps={total}"])
    trainer = Trainer(config)
    t0 = time.perf_counter()
    trainer.setup()
    _sync(spec["device"])
    setup_s = time.perf_counter() - t0
    rss_setup = _rss_mib()
    gpu_setup = torch.cuda.memory_allocated() / 2**20 if cuda else None
    stamps: list[float] = []
    memory: dict = {}

    def rest() -> None:  # resting memory after warm-up; the peaks from here on are the timed steps'
        memory["fresh_peak"] = fresh = _reset_peak_rss()
        memory["rss_rest_mib"] = _status_mib("VmHWM") if fresh else _rss_mib()  # the reset mark itself
        if cuda:
            memory["gpu_rest_mib"] = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()

    log = trainer._log

    def timed_log(terms: dict) -> None:
        _sync(spec["device"])
        stamps.append(time.perf_counter())
        if len(stamps) == warmup:
            rest()
        if len(stamps) == total:  # the peak of the timed steps, before export
            memory["step_peak_rss_mib"] = _status_mib("VmHWM") if memory["fresh_peak"] else _maxrss_mib()
            memory["peak_rss_mib"] = _maxrss_mib()
            if cuda:
                memory["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        log(terms)

    if warmup == 0:
        rest()
    trainer._log = timed_log
    trainer.setup = lambda: None  # done above, outside the timing
    trainer.train()
    timed = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])] if warmup else \
        [b - a for a, b in zip(stamps, stamps[1:])]
    elapsed = sum(timed)
    median = statistics.median(timed)
    result = dict(spec, steps_per_s=len(timed) / elapsed, ms_per_step=1000 * elapsed / len(timed),
                  median_ms=1000 * median, step_ms=[1000 * t for t in timed], setup_s=setup_s,
                  rss_start_mib=rss_start, rss_setup_mib=rss_setup, gpu_setup_mib=gpu_setup,
                  images_per_step=_images_per_step(trainer),
                  trainable_params=sum(p.numel() for p in trainer.params),
                  final_loss=trainer.history[-1]["loss"], torch_threads=torch.get_num_threads(), **memory)
    result["step_delta_mib"] = result["step_peak_rss_mib"] - result["rss_rest_mib"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _images_per_step(trainer) -> int:
    train = trainer.config.train
    prior = 2 if trainer.config.prior.enabled else 1
    return train.batch_size * train.gradient_accumulation_steps * prior


class BareLoop:
    """The same math as ``Method.loss`` + ``Trainer._optimizer_step`` for LoRA, written the way a
    stand-alone diffusers training script does it: VAE encode, tokenize + text encode, noise and
    timesteps, U-Net forward, MSE, backward, clip, AdamW step, loss.item() for the log."""

    def __init__(self, models, params: list, train, device):
        import torch

        from personalize.methods.base import _unwrap

        self.unet, self.vae = _unwrap(models.unet), models.vae
        self.text_encoder, self.tokenizer = models.text_encoders[0], models.tokenizers[0]
        self.scheduler, self.params, self.device = models.noise_scheduler, params, device
        self.max_grad_norm = train.max_grad_norm
        self.optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                           weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
        self.generator = torch.Generator(device=device).manual_seed(0)
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.autocast_dtype = dtypes.get(train.mixed_precision)  # as the trainer: frozen weights in it, autocast

    def step(self, batch: dict) -> float:
        import contextlib

        import torch

        autocast = (contextlib.nullcontext() if self.autocast_dtype is None else
                    torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype))
        with autocast:
            loss = self.loss(batch)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def loss(self, batch: dict):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device)
            latents = self.vae.encode(pixels).latent_dist.sample(generator=self.generator)
            latents = latents * self.vae.config.scaling_factor
            ids = self.tokenizer(batch["prompts"], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            context = self.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=self.generator, device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, context).sample
        return F.mse_loss(prediction.float(), noise.float())


def _extras_breakdown(trainer, batch: dict, reps: int = 200) -> dict[str, float]:
    """Microseconds per step of what the trainer does beyond the bare loop, each timed in isolation
    (steady under machine load, unlike whole steps): the per-step calls of ``_optimizer_step``,
    ``Method.loss`` and the loop body that a bare loop does not make, net of what the bare loop does
    in their place."""
    import torch

    from personalize import losses

    acc, train, params, device = trainer.accelerator, trainer.config.train, trainer.params, trainer.accelerator.device
    seeds, timesteps = batch["sample_seeds"], trainer.models.noise_scheduler.config.num_train_timesteps
    side = batch["pixel_values"].shape[-1] // 8
    shape = (4, side, side)
    generator = torch.Generator(device=device).manual_seed(0)
    loss = torch.tensor(0.5, device=device)
    terms = {"diffusion_loss": loss}

    def regrad():  # stand-in gradients, as backward would leave them
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def per_sample_rng():
        latents = losses.per_sample_randn(seeds, shape, stream=0, device=device)
        losses.sample_noise(seeds, latents)
        losses.sample_timesteps(seeds, timesteps, device)

    def plain_rng():
        torch.randn((len(seeds), *shape), generator=generator, device=device)
        torch.randn((len(seeds), *shape), generator=generator, device=device)
        torch.randint(0, timesteps, (len(seeds),), generator=generator, device=device)

    def contexts():
        with acc.accumulate(*trainer.modules), acc.autocast():
            pass

    def bookkeeping():
        totals = {k: float(v.detach()) for k, v in {**terms, "loss": loss}.items()}
        trainer.lr_scheduler.step()
        totals["lr"] = trainer.lr_scheduler.get_last_lr()[0]
        trainer.method.after_optimizer_step()
        trainer._log(totals)

    # the wrappers' own cost, on a one-number parameter (the optimizer math would drown it in noise)
    from accelerate.optimizer import AcceleratedOptimizer

    probe = torch.zeros(1, device=device, requires_grad=True)
    probe_raw = torch.optim.SGD([probe], lr=0.0)
    probe_wrapped = AcceleratedOptimizer(torch.optim.SGD([probe], lr=0.0), device_placement=False)

    def probe_step(optimizer):
        def run():
            probe.grad = torch.zeros_like(probe)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    items = {
        "`torch.manual_seed` per micro-step (dropout RNG)": (lambda: torch.manual_seed(1234), None),
        "`accumulate()` + `autocast()` contexts": (contexts, None),
        "per-sample seeded latents/noise/timesteps (vs one generator)": (per_sample_rng, plain_rng),
        "`vae.device` + `vae.dtype` in `Models.encode_images` (diffusers walks the submodules)": (
            lambda: (trainer.models.vae.device, trainer.models.vae.dtype), None),
        "NaN guard (`isfinite` + `.item()`)": (lambda: trainer._check_finite(loss, terms), None),
        "loss terms to floats, LR schedule, hooks, history": (bookkeeping, None),
        "accelerate `clip_grad_norm_` (vs torch's)": (
            lambda: acc.clip_grad_norm_(params, train.max_grad_norm or 1.0),
            lambda: torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm or 1.0)),
        "`AcceleratedOptimizer` step + zero_grad wrapper (vs calling the optimizer)": (
            probe_step(probe_wrapped), probe_step(probe_raw)),
    }
    regrad()
    history, step = len(trainer.history), trainer.step
    out = {}
    for name, (extra, baseline) in items.items():
        out[name] = _time_us(extra, reps) - (_time_us(baseline, reps) if baseline else 0.0)
    del trainer.history[history:]
    trainer.step = step
    for p in params:
        p.grad = None
    return out


def _time_us(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    best = float("inf")
    for _ in range(3):  # best of three batches: the least disturbed by other processes
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 1e6 * best


def measure_overhead(spec: dict) -> dict:
    """Trainer vs bare loop on the same modules and batch, interleaved windows in one process."""
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from personalize.data.datasets import StepBatchSampler, collate
    from personalize.trainer import Trainer

    device = spec["device"]
    out_dir = Path(spec["work_dir"]) / "runs" / "overhead"
    trainer = Trainer(_load(spec, out_dir, ["train.max_steps=1000000"]))
    trainer.setup()
    if trainer.config.data.cache or trainer.config.method != "lora":
        raise ValueError("the overhead benchmark compares LoRA without cache")
    acc = trainer.accelerator
    sampler = StepBatchSampler(len(trainer.dataset), trainer.config.train.batch_size, trainer.config.train.seed)
    batch = collate([trainer.dataset[key] for key in next(iter(sampler))])
    same_batch = itertools.repeat(batch)
    loader = iter(DataLoader(trainer.dataset, batch_sampler=StepBatchSampler(
        len(trainer.dataset), trainer.config.train.batch_size, trainer.config.train.seed), collate_fn=collate))
    bare = BareLoop(trainer.models, trainer.params, trainer.config.train, acc.device)
    bare_again = BareLoop(trainer.models, trainer.params, trainer.config.train, acc.device)  # the noise floor

    def trainer_step(batches):
        def run():  # the body of Trainer.train()'s loop, progress bar off
            terms = trainer._optimizer_step(batches, 1)
            trainer.step += 1
            trainer._log(terms)
        return run

    loops = {"bare": lambda: bare.step(batch), "trainer": trainer_step(same_batch),
             "trainer_dataloader": trainer_step(loader), "bare_again": lambda: bare_again.step(batch)}
    warmup, rounds, window = int(spec["warmup"]), int(spec["rounds"]), int(spec["window"])
    for run in loops.values():
        for _ in range(warmup):
            run()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order: no position bias
        for name in order:
            run = loops[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(window):
                run()
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - t0) / window)
    def paired(name: str) -> float:  # median over rounds of (loop / bare - 1), in percent
        return 100 * statistics.median(t / b - 1 for t, b in zip(times[name], times["bare"]))

    median = {name: statistics.median(v) for name, v in times.items()}
    extras = _extras_breakdown(trainer, batch)
    return dict(spec, round_ms=times, median_ms=median, extras_us=extras,
                overhead_pct=paired("trainer"), overhead_dataloader_pct=paired("trainer_dataloader"),
                noise_floor_pct=paired("bare_again"),
                overhead_of_medians_pct=100 * (median["trainer"] / median["bare"] - 1),
                images_per_step=_images_per_step(trainer), torch_threads=torch.get_num_threads())


# -------------------------------------------------------------------------------------------------
# random-weight SD 1.5 / SDXL pipelines of the real architectures
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


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    _set_threads(spec.get("threads"))
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
    proc = subprocess.run([sys.executable, "-m", "personalize.bench", "--worker", json.dumps(spec)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=settings.case_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"benchmark worker {spec.get('label', spec['kind'])} failed (exit {proc.returncode}):\n{tail}")


# -------------------------------------------------------------------------------------------------
# the run
@dataclass
class Report:
    settings: dict
    environment: dict
    cases: list[dict] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    overhead: Optional[dict] = None
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def merge_passes(results: list[dict]) -> dict:
    """One row from several passes of a configuration: the timing of the fastest pass (the one least
    disturbed by other processes), the highest memory peaks of all."""
    best = dict(min(results, key=lambda r: r["median_ms"]))
    best["pass_median_ms"] = [r["median_ms"] for r in results]
    for key in ("peak_rss_mib", "step_delta_mib", "gpu_peak_mib"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            best[key] = max(values)
    return best


def environment(device: str) -> dict:
    import torch

    cpu, logical = platform.processor() or platform.machine(), os.cpu_count()
    try:
        info = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu, logical = (names[0] if names else cpu), len(names) or logical
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        memory = None
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {"cpu": cpu, "cores": logical, "usable_cores": usable, "memory_gib": memory,
           "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "date": now, "device": device, "load_before": _loadavg()}
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - reporting only
            env[name] = "not installed"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = print) -> Report:
    """Run the parts named by ``settings``; write the markdown report if ``settings.output`` is set."""
    start = time.perf_counter()
    if settings.cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if not settings.isolate:
        _set_threads(settings.threads)
    report = Report(settings=dataclasses.asdict(settings), environment=environment(settings.device))
    if settings.threads:
        report.environment["torch_threads"] = settings.threads
    own_work = settings.work_dir is None
    work = Path(settings.work_dir or tempfile.mkdtemp(prefix="personalize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_root = Path(settings.model_dir) if settings.model_dir else work / "models"
    try:
        cases = plan_cases(settings, work)
        for model in ("sd15", "sdxl"):
            if any(c["model"] == model for c in cases) or (model == "sd15" and "overhead" in settings.parts()
                                                            and settings.overhead_base == "sd15"):
                log(f"building a random-weight {model} pipeline in {model_root / model} ...")
                info = run_worker({"kind": "build", "model": model, "out_dir": str(model_root / model),
                                   "device": settings.device}, settings, log)
                report.models[model] = info
                log(f"  {'reused' if info['reused'] else 'built'} ({info['build_s']:.0f} s to build)")
        passes = settings.passes()
        runs: dict[str, list[dict]] = {}
        total = len(cases) * passes
        for n in range(passes):  # every pass runs every configuration; odd passes in reverse order
            for case in (cases if n % 2 == 0 else cases[::-1]):
                spec = dict(case, kind="case", work_dir=str(work))
                if case["model"] in ("sd15", "sdxl"):
                    spec["base"] = str(model_root / case["model"])
                done = sum(len(v) for v in runs.values()) + sum(f.startswith(case["label"] + ":") for f in
                                                                report.failures)
                log(f"[{done + 1}/{total}] {case['label']}{f' (pass {n + 1})' if passes > 1 else ''} ...")
                t0 = time.perf_counter()
                try:
                    result = run_worker(spec, settings, log)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    report.failures.append(f"{case['label']}: {err}")
                    log(f"  FAILED: {err}")
                    continue
                runs.setdefault(case["label"], []).append(result)
                log(f"  {result['steps_per_s']:.3g} steps/s, median {result['median_ms']:.1f} ms/step, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)")
        report.cases = [merge_passes(runs[c["label"]]) for c in cases if c["label"] in runs]
        if "overhead" in settings.parts():
            warmup, rounds, window = settings.overhead_plan()
            resolution = settings.tiny_resolution if settings.overhead_base == "tiny-sd" else settings.sd_resolution("sd15")
            spec = dict(kind="overhead", recipe="tiny/lora", device=settings.device, work_dir=str(work),
                        warmup=warmup, rounds=rounds, window=window, model=settings.overhead_base,
                        resolution=resolution,
                        overrides=["train.report_to=none", "train.progress_bar=false", "train.checkpoint_every=0",
                                   "validation.prompts=[]", "data.cache=false", "train.batch_size=2",
                                   f"train.mixed_precision='{settings.precision()}'",
                                   *_data_overrides("tiny/lora", resolution)])
            if settings.overhead_base == "sd15":
                spec["base"] = str(model_root / "sd15")
            log(f"trainer overhead vs a bare loop ({rounds} rounds x {window} steps) ...")
            try:
                report.overhead = run_worker(spec, settings, log)
                o = report.overhead
                log(f"  trainer {o['median_ms']['trainer']:.1f} ms/step, bare {o['median_ms']['bare']:.1f} ms/step, "
                    f"overhead {o['overhead_pct']:+.1f} %")
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                report.failures.append(f"overhead: {err}")
                log(f"  FAILED: {err}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        elif not settings.model_dir:
            shutil.rmtree(model_root, ignore_errors=True)
    report.environment["load_after"] = _loadavg()
    report.wall_s = time.perf_counter() - start
    if settings.output:
        path = Path(settings.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(report))
    return report


# -------------------------------------------------------------------------------------------------
# markdown
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _memory_columns(cuda: bool) -> list[str]:
    cols = ["peak RSS (MiB)", "step peak over resting RSS (MiB)"]
    return (["GPU peak (MiB)", "GPU resting (MiB)"] + cols) if cuda else cols


def _memory_cells(r: dict, cuda: bool) -> list[str]:
    cells = [_fmt(r.get("peak_rss_mib")), _fmt(r.get("step_delta_mib"))]
    return ([_fmt(r.get("gpu_peak_mib")), _fmt(r.get("gpu_rest_mib"))] + cells) if cuda else cells


def tiny_table(cases: list[dict], cuda: bool = False) -> tuple[list[str], list[list]]:
    header = ["method", "variation", "img/step", "steps/s", "median ms/step", "× baseline", *_memory_columns(cuda),
              "trainable params"]
    rows = []
    baselines = {c["method"]: c for c in cases if c["variation"] == "baseline"}
    for c in cases:
        base = baselines.get(c["method"])
        speed = f"{base['median_ms'] / c['median_ms']:.2f}×" if base else "–"
        rows.append([c["method"], VARIATION_LABELS.get(c["variation"], c["variation"]), c["images_per_step"],
                     _fmt(c["steps_per_s"]), _fmt(c["median_ms"]), speed, *_memory_cells(c, cuda),
                     f"{c['trainable_params']:,}"])
    return header, rows


def sd_table(cases: list[dict], cuda: bool = False) -> tuple[list[str], list[list]]:
    header = ["model", "px", "optimizer / options", "cache", "img/step", "median s/step", "steps/s", "cache speed-up",
              *_memory_columns(cuda)]
    rows = []
    for c in cases:
        twin = next((o for o in cases if o["model"] == c["model"] and o["variation"] == c["variation"]
                     and o["resolution"] == c["resolution"] and not o["cache"]), None)
        speed = f"{twin['median_ms'] / c['median_ms']:.2f}×" if c["cache"] and twin else "–"
        rows.append([c["model"], c["resolution"], c["variation"], "on" if c["cache"] else "off", c["images_per_step"],
                     f"{c['median_ms'] / 1000:.2f}", _fmt(c["steps_per_s"]), speed, *_memory_cells(c, cuda)])
    return header, rows


def overhead_table(o: dict) -> tuple[list[str], list[list]]:
    header = ["loop", "median ms/step", "steps/s", "vs bare loop (median of per-round ratios)"]
    med = o["median_ms"]
    rows = [["bare PyTorch loop", f"{med['bare']:.1f}", _fmt(1000 / med["bare"]), "–"],
            ["Trainer (same batch)", f"{med['trainer']:.1f}", _fmt(1000 / med["trainer"]), f"{o['overhead_pct']:+.1f} %"],
            ["Trainer fed by its DataLoader (PNG decode + resize per step)", f"{med['trainer_dataloader']:.1f}",
             _fmt(1000 / med["trainer_dataloader"]), f"{o['overhead_dataloader_pct']:+.1f} %"]]
    if "bare_again" in med:
        rows.append(["bare PyTorch loop again, a second instance (noise floor)", f"{med['bare_again']:.1f}",
                     _fmt(1000 / med["bare_again"]), f"{o['noise_floor_pct']:+.1f} %"])
    return header, rows


def _passes_text(settings: dict) -> str:
    n = settings.get("repeats") or (1 if settings["quick"] or settings["device"] == "cuda" else 2)
    if n == 1:
        return ""
    return (f"; {n} passes over all configurations (every other one in reverse order), a row showing the "
            f"timing of its fastest pass (the least disturbed by other processes) and the highest memory peaks")


def _passes_details(cases: list[dict]) -> list[str]:
    if not any(len(c.get("pass_median_ms", [])) > 1 for c in cases):
        return []
    lines = ["<details><summary>median ms/step of each pass</summary>", ""]
    lines += [f"- {c['label']}: " + ", ".join(f"{t:.1f}" for t in c["pass_median_ms"]) for c in cases]
    return lines + ["", "</details>", ""]


def render_markdown(report: Report) -> str:
    s, env = report.settings, report.environment
    cuda = s["device"] == "cuda"
    out = ["# Training benchmarks", "",
           "Generated by `eval/bench_train.py` (library code: `personalize/bench.py`). Re-run it to refresh this page.",
           "", f"Command: `{s['command'] or 'python eval/bench_train.py'}`", "",
           "| | |", "|---|---|",
           f"| date | {env['date']} |",
           f"| CPU | {env['cpu']}, {env['cores']} logical cores ({env['usable_cores']} usable), "
           f"{env.get('memory_gib')} GiB RAM |"]
    if cuda:
        out.append(f"| GPU | {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB) |")
    out += [f"| device | {env['device']} (torch threads: {env['torch_threads']}) |",
            f"| software | Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
            f"transformers {env['transformers']}, accelerate {env['accelerate']}, peft {env['peft']}, "
            f"bitsandbytes {env['bitsandbytes']} |",
            f"| platform | {env['platform']} |",
            f"| load average (1/5/15 min) before / after | {env.get('load_before')} / {env.get('load_after')} |",
            f"| mixed precision | {s['mixed_precision'] or ('bf16' if cuda else 'no')} |",
            f"| whole run | {report.wall_s / 60:.1f} min |", ""]
    tiny = [c for c in report.cases if c["part"] == "tiny"]
    if tiny:
        c0 = tiny[0]
        out += ["## A. Methods on the tiny model", "",
                f"Built-in `tiny-sd` (random weights, SD 1.x architecture at ~1 M U-Net parameters), "
                f"{c0['resolution']} px, the shipped `recipes/tiny/*.yaml` recipes (batch as in the recipe; DreamBooth "
                f"adds one class image per instance image), {c0['warmup']} warm-up steps then {c0['steps']} timed "
                f"steps of `Trainer.train()` per run, each run in a fresh process{_passes_text(s)}. "
                f"A baseline per method (no cache, no gradient checkpointing, torch AdamW) and one-factor variations. "
                f"`steps/s` is timed steps over their total time; `× baseline` compares median step times (steadier "
                f"on a shared machine). Peak RSS is dominated by the imported libraries (~0.9 GiB): the tiny "
                f"model itself is a few MiB.",
                "", _table(*tiny_table(tiny, cuda)), "", *_passes_details(tiny)]
    for model in ("sd15", "sdxl"):
        rows = [c for c in report.cases if c["part"] == model]
        if not rows:
            continue
        info = report.models.get(model, {})
        params = info.get("params", {})
        name = "SD 1.5" if model == "sd15" else "SDXL"
        sizes = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in params.items())
        c0 = rows[0]
        out += [f"## B. LoRA on an {name}-architecture model (random weights)", "",
                f"A stock diffusers `{'StableDiffusionPipeline' if model == 'sd15' else 'StableDiffusionXLPipeline'}` "
                f"with {name}'s exact configs ({sizes} parameters; CLIP BPE tokenizer built offline) and random "
                f"weights, saved with `save_pretrained` to a folder and loaded by the trainer as `model.base` "
                f"(building and saving it took {info.get('build_s', 0):.0f} s, not counted below). "
                f"LoRA rank 16 on the U-Net attention, batch 1, {c0['resolution']} px, {c0['warmup']} warm-up "
                f"step(s) then {c0['steps']} timed step(s) per run, each run in a fresh process{_passes_text(s)}. "
                f"`data.cache=true` encodes the images with the VAE and the prompts with the text encoder once, "
                f"before training, so a step skips both. The text encoder's cost per step does not depend on the "
                f"resolution while the U-Net's (and the VAE's) grows with the pixel count, so expect a smaller "
                f"speed-up at 512 px than at a small resolution (`--resolution 512` measures it).",
                "", _table(*sd_table(rows, cuda)), "", *_passes_details(rows)]
    if report.overhead:
        o = report.overhead
        out += ["## C. Trainer overhead over a bare PyTorch loop", "",
                f"`{o['model']}`, LoRA, {o['resolution']} px, batch {o['images_per_step']}, no cache, in one process "
                f"on the same modules and the same collated batch. The bare loop "
                f"(`personalize.bench.BareLoop`) does what a stand-alone diffusers script does: VAE encode + sample, "
                f"tokenize + text encode, noise and timesteps, U-Net forward, MSE, backward, gradient clipping, "
                f"torch AdamW step, `loss.item()`; a second instance of it, timed like the others, shows how much two "
                f"identical loops differ here (the noise floor). The trainer row runs the body of `Trainer.train()`'s loop "
                f"(`_optimizer_step` + logging; progress bar off). {o['warmup']} warm-up steps each, then "
                f"{o['rounds']} rounds of one {o['window']}-step window per loop, the order rotating every round; "
                f"ms/step is the median window, the overhead the median of the per-round ratios trainer/bare "
                f"(ratio of the medians: {o['overhead_of_medians_pct']:+.1f} %).", "",
                _table(*overhead_table(o)), ""]
        if o.get("extras_us"):
            total = sum(o["extras_us"].values())
            rows = [[name, f"{us:.0f}"] for name, us in o["extras_us"].items()]
            rows.append(["**total**", f"**{total:.0f}**"])
            out += [f"What the trainer does per step that the bare loop does not, each piece timed alone (best of "
                    f"3 × 200 calls, net of the bare loop's counterpart where it has one): {total / 1000:.2f} ms, "
                    f"{100 * total / 1000 / o['median_ms']['bare']:.1f} % of a bare step here.", "",
                    _table(["trainer-only work per step", "µs"], rows), ""]
        out += ["<details><summary>ms per round</summary>", ""]
        out += [f"- {k}: " + ", ".join(f"{t:.1f}" for t in v) for k, v in o["round_ms"].items()]
        out += ["", "</details>", ""]
    out += ["## Notes", "",
            "- **Timing**: wall time between the ends of consecutive optimizer steps after the warm-up steps "
            "(CUDA is synchronized first); setup, class-image generation, latent caching and the final export are "
            "not timed.",
            "- **Memory**: `peak RSS` is the process's `ru_maxrss` (everything since it started: imports, model "
            "loading, caching, training). `step peak over resting RSS` is the highest resident set size during the "
            "timed steps (the kernel's `VmHWM`, reset through `/proc/self/clear_refs` after the warm-up) minus the "
            "resident set size right after the warm-up (models paged in, optimizer state allocated): what one "
            "training step needs on top (activations, gradients, temporaries)"
            + (". On CUDA, `GPU peak` is `torch.cuda.max_memory_allocated()` over the timed steps (reset after "
               "the warm-up) and `GPU resting` what stays allocated between steps (models, optimizer state)."
               if cuda else "."),
            "- **Cache**: `data.cache=true` caches VAE latents (posterior mean and std; the latent is still sampled "
            "per step) for every method, and text embeddings only where the text encoder is frozen (LoRA, "
            "DreamBooth here); Textual Inversion and this text2image recipe train the text encoder, so only the "
            "VAE is skipped.",
            "- The machine may be shared: the load average above shows how busy it was. On a busy machine the "
            "absolute numbers drop; a process with as many torch threads as cores then loses much more (its "
            "OpenMP threads wait on each other) than one with fewer, hence `--threads 1` there. Part C's "
            "interleaving keeps its comparison fair either way.",
            "- GPU runs: `python eval/bench_train.py --device cuda` (SD 1.5 at 512 px and SDXL at 1024 px, with "
            "8-bit AdamW + gradient checkpointing, bf16 autocast); `--quick`, `--only tiny|sd15|sdxl|overhead`, "
            "`--resolution`, `--steps`; `--help` for all options.", ""]
    if report.failures:
        out += ["## Failures", ""] + [f"- {f.splitlines()[0]} `{f.splitlines()[-1]}`" for f in report.failures] + [""]
    return "\n".join(out)


def print_summary(report: Report, log: Callable[[str], None] = print) -> None:
    log(render_markdown(report))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python eval/bench_train.py --help")
