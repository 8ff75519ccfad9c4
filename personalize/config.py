"""Typed configs: a YAML recipe plus dotted overrides become validated dataclasses.

A recipe has the sections ``model``, ``data``, ``prior``, ``train``, ``validation`` and one section
named after the method (``lora:``, ``dreambooth:``, ...), whose dataclass the method registers.
Unknown keys are errors that name the key and the closest valid one; values are type-checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from personalize.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by ``personalize recipes --explain``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelConfig:
    base: str = option("tiny-sd", "hub id, local diffusers folder, single .safetensors/.ckpt file, "
                                  "or a built-in tiny model: tiny-sd, tiny-sd2-v, tiny-sdxl")
    family: Literal["auto", "sd", "sdxl"] = option("auto", "model family; auto-detected from the files")
    revision: Optional[str] = option(None, "hub revision")
    variant: Optional[str] = option(None, "weight variant, e.g. fp16")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = option(
        "auto", "override the scheduler's prediction type (SD 2.x 768 models use v_prediction)")
    vae: Optional[str] = option(None, "a separate VAE: a diffusers AutoencoderKL folder (or a pipeline folder with vae/)")
    attention: Literal["default", "classic"] = option(
        "default", "U-Net attention processor: default (SDPA) or classic (diffusers' AttnProcessor, faster on CPU)")
    allow_pickle: bool = option(False, "allow loading pickled .ckpt/.bin/.pt files (they can execute code)")
    single_file_config: Optional[str] = option(
        None, "local diffusers folder whose configs describe a single-file checkpoint (offline use)")


@dataclass
class DataConfig:
    instance_images: Optional[str] = option(None, "folder of subject photos (optional NAME.txt caption beside each)")
    instance_prompt: Optional[str] = option(None, "prompt with the unique token, e.g. 'a photo of sks dog'")
    metadata: Optional[str] = option(None, "JSONL of {file_name, text} records (text2image); file_name relative to it")
    caption_extension: str = option(".txt", "caption file extension beside each image")
    resolution: int = option(512, "training resolution in pixels (multiple of 8)")
    center_crop: bool = option(True, "center crop; false = random crop")
    random_flip: bool = option(False, "random horizontal flip")
    repeats: int = option(1, "repeat the image list this many times per epoch")
    caption_dropout: float = option(0.0, "probability of training on the empty caption (for guidance)")
    skip_bad_images: bool = option(False, "skip unreadable/too small images with a warning instead of failing")
    min_image_size: int = option(0, "smallest accepted image side in pixels; 0 = resolution // 2")
    cache: bool = option(False, "cache VAE latents and text embeddings when those encoders are frozen")
    num_workers: int = option(0, "dataloader worker processes")
    toyworld_images: int = option(0, "render this many toy-world images into data.metadata's folder if it is missing")
    toyworld_seed: int = option(0, "seed of the rendered toy-world training set")

    def __post_init__(self) -> None:
        _check(self.resolution > 0 and self.resolution % 8 == 0, "data.resolution",
               f"must be a positive multiple of 8, got {self.resolution}")
        _check(self.resolution <= MAX_RESOLUTION, "data.resolution", f"must be <= {MAX_RESOLUTION}, got {self.resolution}")
        _check(0 <= self.min_image_size <= MAX_RESOLUTION, "data.min_image_size",
               f"must be in [0, {MAX_RESOLUTION}], got {self.min_image_size}")
        _check(1 <= self.repeats <= 100_000, "data.repeats", f"must be in [1, 100000], got {self.repeats}")
        _check(0 <= self.toyworld_images <= 10_000_000, "data.toyworld_images", "must be in [0, 10000000]")
        _check(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout", "must be in [0, 1)")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        if self.cache and (self.random_flip or not self.center_crop):
            raise ConfigError("data.cache: cached latents need deterministic images; "
                              "set data.random_flip=false and data.center_crop=true, or data.cache=false")


@dataclass
class PriorConfig:
    enabled: bool = option(False, "prior preservation: also train on class images with the class prompt")
    class_images: Optional[str] = option(None, "folder of class images; generated with the base model if short")
    class_prompt: Optional[str] = option(None, "prompt of the class, e.g. 'a photo of a dog'")
    num_class_images: int = option(100, "class images wanted; missing ones are generated and saved")
    prior_loss_weight: float = option(1.0, "weight of the prior-preservation loss")
    generation_steps: int = option(25, "sampling steps when generating class images")
    generation_batch_size: int = option(4, "batch size when generating class images")
    guidance_scale: float = option(7.5, "guidance scale when generating class images")

    def __post_init__(self) -> None:
        if self.enabled:
            _check(bool(self.class_images), "prior.class_images", "is required when prior.enabled is true")
            _check(bool(self.class_prompt), "prior.class_prompt", "is required when prior.enabled is true")
        _check(1 <= self.num_class_images <= 1_000_000, "prior.num_class_images", "must be in [1, 1000000]")
        _check(1 <= self.generation_steps <= 1000, "prior.generation_steps", "must be in [1, 1000]")
        _check(1 <= self.generation_batch_size <= MAX_BATCH_SIZE, "prior.generation_batch_size",
               f"must be in [1, {MAX_BATCH_SIZE}]")
        _check(self.prior_loss_weight >= 0, "prior.prior_loss_weight", "must be >= 0")


@dataclass
class TrainConfig:
    output_dir: str = option("outputs/run", "where checkpoints, logs, validation images and the export go")
    seed: int = option(0, "random seed; the same seed gives the same run, resumed or not")
    max_steps: int = option(400, "optimizer steps")
    batch_size: int = option(1, "per-process batch size (instance images; prior adds as many class images)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(5e-6, "peak learning rate")
    scale_lr: bool = option(False, "multiply the learning rate by batch size x accumulation x processes")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine",
                          "cosine_with_restarts", "polynomial"] = option("constant", "learning-rate schedule")
    lr_warmup_steps: int = option(0, "warm-up steps of the schedule")
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "adamw (torch) or adamw8bit (bitsandbytes)")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "Adam epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = option(
        "no", "autocast precision; trainable weights stay fp32. auto: bf16 where the GPU or CPU has bf16 "
              "instructions, fp16 on other GPUs, else no (personalize/utils/precision.py)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in U-Net / text encoder")
    snr_gamma: Optional[float] = option(None, "min-SNR-gamma loss weighting (5.0 is the paper's value)")
    noise_offset: float = option(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images)")
    ema: bool = option(False, "keep an exponential moving average of the trainable weights and export it")
    ema_decay: float = option(0.9999, "EMA decay")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N steps (0 = only on stop)")
    checkpoints_total_limit: Optional[int] = option(3, "keep the newest N checkpoints")
    resume: Optional[str] = option(None, "'auto' = newest checkpoint in output_dir, or a checkpoint folder")
    overwrite: bool = option(False, "allow a run in an output_dir that holds a finished run; its export, config.yaml "
                                    "and run_summary.json are replaced only when this run exports")
    report_to: Literal["tensorboard", "wandb", "none"] = option("tensorboard", "experiment tracker")
    log_every: int = option(10, "log the loss every N steps")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def __post_init__(self) -> None:
        _check(1 <= self.max_steps <= 100_000_000, "train.max_steps", f"must be in [1, 100000000], got {self.max_steps}")
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "train.batch_size",
               f"must be in [1, {MAX_BATCH_SIZE}], got {self.batch_size}; use gradient_accumulation_steps for more")
        _check(1 <= self.gradient_accumulation_steps <= 100_000, "train.gradient_accumulation_steps",
               f"must be in [1, 100000], got {self.gradient_accumulation_steps}")
        _check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.snr_gamma is None or self.snr_gamma > 0, "train.snr_gamma", "must be > 0 (or null)")
        _check(self.noise_offset >= 0, "train.noise_offset", "must be >= 0")
        _check(0.0 < self.ema_decay < 1.0, "train.ema_decay", "must be in (0, 1)")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               "train.checkpoints_total_limit", "must be >= 1 (or null to keep all)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")


@dataclass
class ValidationConfig:
    prompts: list[str] = option([], "prompts rendered into a PNG grid every `every` steps and at the end")
    negative_prompt: Optional[str] = option(None, "negative prompt for validation images")
    every: int = option(0, "validate every N steps (0 = only after training)")
    num_images_per_prompt: int = option(2, "images per validation prompt")
    num_inference_steps: int = option(25, "sampling steps")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    seed: int = option(0, "sampling seed")

    def __post_init__(self) -> None:
        _check(self.every >= 0, "validation.every", "must be >= 0")
        _check(1 <= self.num_images_per_prompt <= 64, "validation.num_images_per_prompt", "must be in [1, 64]")
        _check(1 <= self.num_inference_steps <= 1000, "validation.num_inference_steps", "must be in [1, 1000]")


@dataclass
class Config:
    method: str
    model: ModelConfig
    data: DataConfig
    prior: PriorConfig
    train: TrainConfig
    validation: ValidationConfig
    method_config: Any  # the dataclass the method registered, filled from the section named after it
    source: Optional[str] = None  # the recipe file, for messages and for the saved copy

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for section in SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        out[self.method] = dataclasses.asdict(self.method_config)
        return out


MAX_RESOLUTION = 4096  # pixels per side; FLUX trains at 2048 at most
MAX_BATCH_SIZE = 1024  # per process and micro-batch


def check_memory(config: Config, total_bytes: Optional[int] = None) -> None:
    """Refuse a batch whose images alone cannot fit in this machine's memory (before anything loads)."""
    total = total_bytes if total_bytes is not None else _physical_memory()
    if not total:
        return
    images = config.train.batch_size * (2 if config.prior.enabled else 1)
    need = images * 3 * config.data.resolution ** 2 * 4 * 2  # float32 pixels, plus the decoded images
    if need > total:
        raise ConfigError(f"train.batch_size={config.train.batch_size} at data.resolution={config.data.resolution}: "
                          f"one batch of images needs {need / 2**30:.1f} GiB, more than this machine's "
                          f"{total / 2**30:.1f} GiB; lower them (gradient_accumulation_steps keeps the effective batch)")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "prior": PriorConfig,
    "train": TrainConfig, "validation": ValidationConfig,
}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def closest_key(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type annotation, converting only lossless cases."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
            value = {False: "no", True: "yes"}[value] if any(a in ("no", "yes") for a in args) else value
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:  # YAML reads '1e-4' (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if annotation is Any:
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def build_section(cls: type, values: Optional[dict], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and bad types raise ConfigError."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}.{key}'{closest_key(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=400`` -> (['train', 'max_steps'], 400); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist (see `personalize recipes` for the shipped ones)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping with a 'method' key")
    return raw
