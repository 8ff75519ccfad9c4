"""Measurements, run inside a worker: memory helpers (``VmRSS`` / ``VmHWM`` / ``ru_maxrss``),
:func:`measure_case` (timed ``Trainer.train()`` steps of one configuration), :class:`BareLoop` and
:func:`measure_overhead` (the trainer against a bare PyTorch loop, with a breakdown of the trainer-only
work per step)."""

from __future__ import annotations

import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Optional


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


# workers (run in a fresh subprocess, or in-process when isolate=False)
def _load(spec: dict, out_dir: Path, extra: list[str] = ()):
    from personalize.recipes import resolve_recipe
    from personalize.recipes import load_config

    # the benchmark's own scratch runs in its work folder: a rerun replaces them
    overrides = [*spec["overrides"], f"train.output_dir={out_dir}", "train.overwrite=true", *extra]
    if spec.get("base"):
        overrides.append(f"model.base={spec['base']}")
    return load_config(resolve_recipe(spec["recipe"]), overrides)


def measure_case(spec: dict) -> dict:
    """Train one configuration with ``Trainer.train()``; time the steps after warm-up, record memory."""
    import torch

    from personalize.training.trainer import Trainer

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

        from personalize.methods.base import unwrap

        self.unet, self.vae = unwrap(models.unet), models.vae
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


def _optimizer_wrapper_probe(device):
    """(an ``AcceleratedOptimizer`` step + zero_grad, the same on the bare optimizer), on a one-number parameter:
    the wrapper's own cost (the optimizer math would drown it in noise)."""
    import torch
    from accelerate.optimizer import AcceleratedOptimizer

    probe = torch.zeros(1, device=device, requires_grad=True)

    def step(optimizer):
        def run():
            probe.grad = torch.zeros_like(probe)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    return (step(AcceleratedOptimizer(torch.optim.SGD([probe], lr=0.0), device_placement=False)),
            step(torch.optim.SGD([probe], lr=0.0)))


def _extras_breakdown(trainer, batch: dict, reps: int = 200) -> dict[str, float]:
    """Microseconds per step of what the trainer does beyond the bare loop, each timed in isolation
    (steady under machine load, unlike whole steps): the per-step calls of ``_optimizer_step``,
    ``Method.loss`` and the loop body that a bare loop does not make, net of what the bare loop does
    in their place."""
    import torch

    from personalize.methods import losses

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

    wrapped_step, raw_step = _optimizer_wrapper_probe(device)
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
            wrapped_step, raw_step),
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
    from personalize.training.trainer import Trainer

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
