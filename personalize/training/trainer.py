"""THE training loop. One loop over ``accelerate.Accelerator`` for every method.

The trainer owns precision, accumulation, distribution, optimizer and schedule, clipping, the NaN
guard, EMA, logging, validation images, checkpoints and resume, clean stops on SIGINT/SIGTERM and
the final export. A method (``personalize.methods``) only says what trains and how the loss is made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from personalize.config import Config, ConfigError
from personalize.data.cache import TextCache, cache_latents
from personalize.data.class_images import ensure_class_images
from personalize.data.datasets import PriorPairDataset, StepBatchSampler, collate
from personalize.methods import get_method_class
from personalize.methods.base import unwrap
from personalize.errors import CheckpointError, OutputError, TrainingDiverged
from personalize.models import load_models
from personalize.training import checkpoints as checkpointing
from personalize.training.accelerator import fresh_accelerator_state, multi_process_without_accelerator
from personalize.training.optimizers import build_lr_scheduler, build_optimizer
from personalize.training.checkpoints import StopRequest, TrainingStopped
from personalize.utils.files import atomic_write_json, move_into, save_image
from personalize.utils.precision import resolve_mixed_precision
from personalize.utils.output_dir import OutputFolder, is_main_process
from personalize.utils.trees import flatten

logger = logging.getLogger("personalize")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUMMARY_FILE = "run_summary.json"  # written last by the export: its presence means a finished run


class Trainer:
    def __init__(self, config: Config, method=None):
        self.config = config
        self.method = method or get_method_class(config.method)(config)
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.step = 0
        self.history: list[dict] = []  # logged loss terms per step (main process)

    # ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, train, method = self.config, self.config.train, self.method
        log_with = None if train.report_to == "none" else train.report_to
        fresh_accelerator_state()
        force_cpu = multi_process_without_accelerator()
        self.mixed_precision = precision = resolve_mixed_precision(
            train.mixed_precision, "cuda" if torch.cuda.is_available() and not force_cpu else "cpu")
        if precision != train.mixed_precision:
            logger.info("train.mixed_precision: auto -> %s", precision)
        self.accelerator = acc = Accelerator(
            mixed_precision=precision, gradient_accumulation_steps=train.gradient_accumulation_steps,
            log_with=log_with, cpu=force_cpu,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if acc.num_processes != world:  # each rank would train alone and all would write the same files
            raise RuntimeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a group of "
                               f"{acc.num_processes} ({acc.distributed_type}); check the launcher's settings")
        if precision == "fp16" and not acc.native_amp:
            raise ConfigError(f"train.mixed_precision: fp16 needs a CUDA/XPU/MPS device, this run is on "
                              f"{acc.device}; use auto, no, or bf16 (fast only on CPUs with bf16 instructions)")
        self.models = models = load_models(cfg.model)
        set_seed(train.seed)  # what a method draws in setup (LoRA init) follows train.seed, not the RNG's history
        method.setup(models)
        if method.needs_class_images():
            if acc.is_main_process:
                made = ensure_class_images(cfg.prior, models, cfg.data.resolution, train.seed, acc.device,
                                           progress=train.progress_bar)
                logger.info("generated %d class images in %s", made, cfg.prior.class_images)
            acc.wait_for_everyone()
        self.dataset = method.dataset()

        self.weight_dtype = DTYPES[precision]
        full_precision = {id(m) for m in method.full_precision_modules()}
        for module in [models.vae, *models.text_encoders, models.unet]:
            module.to(acc.device)
            for p in module.parameters():  # trainable weights stay fp32: no "unscale FP16 gradients"
                keep = p.requires_grad or id(module) in full_precision
                p.data = p.data.to(torch.float32 if keep else self.weight_dtype)
        if train.gradient_checkpointing:
            method.gradient_checkpointing()
        text_cache = self._cache() if cfg.data.cache else None

        self.params = [p for group in method.trainable_parameters() for p in group["params"]]
        if not self.params:
            raise RuntimeError(f"method {method.name} has no trainable parameters")
        lr = train.learning_rate
        if train.scale_lr:
            lr *= train.batch_size * train.gradient_accumulation_steps * acc.num_processes
        self.optimizer = build_optimizer(method.trainable_parameters(), train, lr)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, train)
        names = list(method.trainable_modules())
        prepared = acc.prepare(*method.trainable_modules().values(), self.optimizer)
        self.modules, self.optimizer = list(prepared[:-1]), prepared[-1]
        self._install_prepared(dict(zip(names, self.modules)))
        method.bind(self.models, text_cache)  # the one handover: what the loss runs on
        self.ema = None
        if train.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=train.ema_decay)
            self.ema.to(acc.device)
        checkpointing.register_accelerate_format(acc, method, [self.lr_scheduler, self.ema])

    def _install_prepared(self, prepared: dict) -> None:
        """Put the (possibly DDP-wrapped) trainable modules back into the model bundle."""
        models = self.models
        if "unet" in prepared:
            models.unet = prepared["unet"]
        if "vae" in prepared:
            models.vae = prepared["vae"]
        for i, key in enumerate(["text_encoder", "text_encoder_2"][: len(models.text_encoders)]):
            if key in prepared:
                models.text_encoders[i] = prepared[key]

    def _cache(self):
        """Cache the VAE latents (on disk) and, when the text encoders are frozen, the text embeddings
        (returned, for :meth:`Method.bind`)."""
        datasets = [self.dataset.instance, self.dataset.class_] if isinstance(self.dataset, PriorPairDataset) else [self.dataset]
        show = self.config.train.progress_bar and self.accelerator.is_main_process
        for i, dataset in enumerate(datasets):  # kept on disk: a resumed run does not encode again
            cache_latents(dataset, self.models, self.accelerator.device, progress=show,
                          cache_file=self.output_dir / "cache" / f"latents-{i}.safetensors",
                          write=self.accelerator.is_main_process)
        if self.method.trains_text_encoder:
            return None
        cache = TextCache(self.models)
        with self.accelerator.autocast():
            cache.fill(self.method.prompts([e.prompt for d in datasets for e in d.examples] + [""]))
        return cache

    # ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """A checkpoint with no pickle in it (:mod:`personalize.training.checkpoints`); DeepSpeed's own format
        (``accelerator.save_state``, pickled) only under DeepSpeed, whose optimizer state is sharded."""
        acc = self.accelerator
        state = {"global_step": self.step, "method": self.method.name, "config": self.config.to_dict(),
                 "train_seconds": self.train_seconds()}
        keep = self.config.train.checkpoints_total_limit
        if self._deepspeed():
            return checkpointing.save_with_accelerate(acc, self.checkpoint_root, self.step, state, keep)
        weights = self.method.trainable_state_dict() if acc.is_main_process else {}
        return checkpointing.save(acc, self.checkpoint_root, self.step, state, keep, weights,
                                  checkpointing.state_of(self._stateful()))

    def _stateful(self) -> dict:
        """What a checkpoint restores besides the weights: objects with ``state_dict`` / ``load_state_dict``."""
        return {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "ema": self.ema,
                "scaler": getattr(self.accelerator, "scaler", None)}

    def _deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _resume(self) -> None:
        cfg = self.config
        found = checkpointing.find_resume(cfg.train.resume, self.checkpoint_root, self.method.name, cfg.to_dict(),
                                          cfg.model.allow_pickle)
        if found is None:
            return
        checkpoint, state = found
        if state.get("format", 1) < checkpointing.FORMAT or self._deepspeed():
            # accelerate's format unpickles; find_resume refused it unless model.allow_pickle is true
            if not cfg.model.allow_pickle:
                raise CheckpointError(f"{checkpoint} is in accelerate's pickled format; set model.allow_pickle=true "
                                      f"if you trust it")
            self.accelerator.load_state(str(checkpoint))
        else:
            weights, training_state = checkpointing.load(self.accelerator, checkpoint, state)
            checkpointing.restore(checkpoint, lambda: self.method.load_trainable_state_dict(weights), self._stateful(),
                                  training_state)
        self.step = int(state["global_step"])
        self._seconds_before = float(state.get("train_seconds", 0.0))
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def train_seconds(self) -> float:
        """Wall time of the training loop so far, over every resumed segment of this run."""
        start = getattr(self, "_loop_start", None)
        return getattr(self, "_seconds_before", 0.0) + (time.perf_counter() - start if start else 0.0)

    # ---------------------------------------------------------------------------------------------
    def output_folder(self) -> OutputFolder:
        """``train.output_dir``: writable, not holding a finished run (unless ``train.overwrite``), not
        holding the run's inputs; locked while the run lasts."""
        cfg = self.config
        inputs = {"data.instance_images": [cfg.data.instance_images], "data.metadata": [cfg.data.metadata],
                  "model.base": [cfg.model.base if Path(cfg.model.base).expanduser().exists() else None],
                  "model.vae": [cfg.model.vae]}
        return OutputFolder(self.output_dir, "train.output_dir", finished=SUMMARY_FILE, overwrite=cfg.train.overwrite,
                            overwrite_option="train.overwrite=true", inputs=inputs)

    def train(self) -> Path:
        """Run to ``train.max_steps`` (resuming if asked) and export; return the output folder.

        The output folder is checked and locked before anything loads (the main process holds the lock);
        SIGINT/SIGTERM during set-up stop at once, during training after the current step."""
        if not is_main_process():
            return self._train()
        with self.output_folder().claim():
            return self._train()

    def _train(self) -> Path:
        with StopRequest(immediate=True) as stop:
            if not hasattr(self, "accelerator"):
                self.setup()
            return self._loop(stop)

    def _loop(self, stop: StopRequest) -> Path:
        cfg, train, acc = self.config, self.config.train, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_stale_temporaries(self.checkpoint_root)
        self._resume()
        if acc.log_with:
            acc.init_trackers("personalize", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in flatten(cfg.to_dict()).items()})
        accumulation = train.gradient_accumulation_steps
        sampler = StepBatchSampler(len(self.dataset), train.batch_size, train.seed, self.step * accumulation,
                                   acc.process_index, acc.num_processes)
        batches = iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                  num_workers=cfg.data.num_workers))
        bar = tqdm(total=train.max_steps, initial=self.step, desc=f"{self.method.name}",
                   disable=not (train.progress_bar and acc.is_main_process))
        self._loop_start = time.perf_counter()
        stop.immediate = False  # from here a signal finishes the step and saves a checkpoint
        if stop.signum:
            raise TrainingStopped(128 + stop.signum)
        while self.step < train.max_steps:
            terms = self._optimizer_step(batches, accumulation)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            self._log(terms)
            if train.checkpoint_every and self.step % train.checkpoint_every == 0 and self.step < train.max_steps:
                self.save_checkpoint()
            if cfg.validation.prompts and cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()
            if self._stop_requested(stop):
                path = self.save_checkpoint()
                bar.close()
                acc.end_training()
                logger.warning("stopped at step %d; checkpoint %s; rerun with train.resume=auto to continue",
                               self.step, path)
                raise TrainingStopped(128 + stop.signum)
        bar.close()
        if train.checkpoint_every:
            self.save_checkpoint()
        if cfg.validation.prompts and not (cfg.validation.every and self.step % cfg.validation.every == 0):
            self.validate()
        self.export()
        acc.end_training()
        return self.output_dir

    def _optimizer_step(self, batches, accumulation: int) -> dict:
        acc, train = self.accelerator, self.config.train
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            batch = next(batches)
            # global RNG (dropout) is a function of (seed, micro-step, rank) alone: resumable
            torch.manual_seed(train.seed * 1_000_003 + (self.step * accumulation + micro) * 1009 + acc.process_index)
            with acc.accumulate(*self.modules):
                with acc.autocast():
                    terms = self.method.loss(batch)
                loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
                self._check_finite(loss, terms)
                acc.backward(loss)
                if acc.sync_gradients and train.max_grad_norm:
                    acc.clip_grad_norm_(self.params, train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in {**terms, "loss": loss}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / accumulation
        if not acc.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.method.after_optimizer_step()
        if self.ema is not None:
            self.ema.step(self.params)
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        return totals

    def _check_finite(self, loss: torch.Tensor, terms: dict) -> None:
        finite = torch.isfinite(loss.detach()).float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite.to(self.accelerator.device), reduction="min")
        if finite.item() < 1:
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            raise TrainingDiverged(
                f"loss is not finite at step {self.step + 1} ({values}); stopped without exporting weights. "
                f"Lower train.learning_rate, use mixed_precision=bf16 or no, or resume from a checkpoint in "
                f"{self.checkpoint_root}.")

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.accelerator.num_processes == 1:
            return bool(stop.signum)
        flag = torch.tensor(float(stop.signum), device=self.accelerator.device)
        stop.signum = int(self.accelerator.reduce(flag, reduction="max").item())
        return bool(stop.signum)

    def _log(self, terms: dict) -> None:
        acc = self.accelerator
        if acc.num_processes > 1:  # log the mean over processes, not rank 0's share of the batch
            keys = sorted(k for k in terms if k != "lr")
            values = acc.reduce(torch.tensor([terms[k] for k in keys], device=acc.device), reduction="mean")
            terms = {**terms, **dict(zip(keys, values.tolist()))}
        if self.accelerator.is_main_process:
            self.history.append({"step": self.step, **terms})
        if self.accelerator.log_with and (self.step % self.config.train.log_every == 0 or self.step == 1):
            self.accelerator.log({f"train/{k}": v for k, v in terms.items()}, step=self.step)

    # ---------------------------------------------------------------------------------------------
    def inference_models(self, reload_frozen: bool = False):
        """The model bundle with unwrapped modules; frozen modules reloaded in fp32 if asked."""
        models = dataclasses.replace(self.models, unet=unwrap(self.models.unet), vae=unwrap(self.models.vae),
                                     text_encoders=[unwrap(e) for e in self.models.text_encoders])
        if reload_frozen and self.weight_dtype != torch.float32:
            fresh = load_models(self.config.model)
            trained = {id(unwrap(m)) for m in self.method.trainable_modules().values()}
            if id(models.vae) not in trained:
                models.vae = fresh.vae
            models.text_encoders = [e if id(e) in trained else f.to(e.device)
                                    for e, f in zip(models.text_encoders, fresh.text_encoders)]
        return models

    def validate(self) -> Path | None:
        from personalize.sampling import image_grid, render

        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        v = self.config.validation
        with self.accelerator.autocast():
            images = render(self.inference_models(), self.method.prompts(v.prompts), v.num_images_per_prompt,
                            v.num_inference_steps, v.guidance_scale, v.seed, self.config.data.resolution,
                            negative_prompt=v.negative_prompt, device=self.accelerator.device)
        grid = image_grid(images, rows=len(v.prompts))
        path = self.output_dir / "validation" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        self.accelerator.wait_for_everyone()
        return path

    def export(self) -> list[Path]:
        """Write the method's output files into output_dir (through a temporary folder)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return []
        if self.ema is not None:
            self.ema.copy_to(self.params)
        models = self.inference_models(reload_frozen=True)
        tmp = self.output_dir / ".export-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            self.method.export(models, tmp)
            # the config beside an export is the one that produced it: written with it, never before
            (tmp / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"train.output_dir: exporting into {self.output_dir} failed ({err.strerror or err}); "
                              f"nothing was exported; checkpoints are in {self.checkpoint_root}") from None
        # a folder without run_summary.json is not finished: drop the old one first, write the new one last
        (self.output_dir / SUMMARY_FILE).unlink(missing_ok=True)
        written = move_into(tmp, self.output_dir)
        summary = {"method": self.method.name, "steps": self.step, "files": [p.name for p in written],
                   "train_seconds": round(self.train_seconds(), 1), "mixed_precision": self.mixed_precision,
                   "final_loss": self.history[-1]["loss"] if self.history else None}
        atomic_write_json(self.output_dir / SUMMARY_FILE, summary)
        logger.info("exported %s to %s", ", ".join(p.name for p in written), self.output_dir)
        return written


def train(config: Config) -> Path:
    return Trainer(config).train()


__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped", "train"]
