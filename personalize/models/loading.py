"""Load SD 1.x / 2.x / SDXL components from a hub id, a local diffusers folder or a single file.

Offline, a hub id that is not in the local cache fails at once with a message that says how to point
at a local copy. Pickled checkpoints (.ckpt/.bin/.pt/.pth) can execute code when loaded and are
refused unless ``model.allow_pickle: true``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from personalize.errors import ModelLoadError
from personalize.models.tiny import TINY_MODELS, build_tiny

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth"}
SINGLE_FILE_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES




def load_components(config) -> tuple[str, dict]:
    """Return (family name, diffusers components) for ``config.base`` (a :class:`ModelConfig`)."""
    base = config.base
    if base in TINY_MODELS:
        return build_tiny(base)
    if base == "toy-init":
        from personalize.models.toy import build_toy_init
        return build_toy_init()
    if base == "toy":
        from personalize.models.toy import toy_model_path
        return _load_folder(toy_model_path(), config)
    path = Path(base).expanduser()
    if path.is_dir():
        return _load_folder(path, config)
    if path.is_file():
        return _load_single_file(path, config)
    if base.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES or base.count("/") > 1:
        raise ModelLoadError(f"model.base: {base} does not exist")
    return _load_folder(_hub_snapshot(base, config), config)


def _refuse_pickle(path: Path, config) -> None:
    if not config.allow_pickle:
        raise ModelLoadError(
            f"model.base: {path} is a pickled checkpoint, and loading a pickle can execute arbitrary code. "
            "Convert it to .safetensors, or set model.allow_pickle=true if you trust its source."
        )


def _load_folder(path: Path, config) -> tuple[str, dict]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"model.base: {path} is not a diffusers model folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"model.base: {index_file} is not valid JSON ({err})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"model.base: {index_file} is not a diffusers model index (a JSON object)")
    family = "sdxl" if "text_encoder_2" in index or "XL" in index.get("_class_name", "") else "sd"
    weights = [p for p in path.glob("*/*") if p.suffix in {".safetensors", ".bin"}]
    use_safetensors = any(p.suffix == ".safetensors" for p in weights)
    if not use_safetensors:
        _refuse_pickle(path, config)
    # fp32 in memory whatever the files hold (the toy model ships fp16 files; transformers 5 would keep fp16)
    kw = dict(variant=config.variant, use_safetensors=use_safetensors, torch_dtype=torch.float32)
    try:
        components = {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        }
        if family == "sdxl":
            components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **kw)
            components["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    except (OSError, ValueError, EnvironmentError, SafetensorError) as err:
        raise ModelLoadError(f"model.base: could not load {path}: {err}") from None
    return family, components


def _read_checkpoint(path: Path, prefix: str = "", keys_only: bool = False) -> dict:
    """Tensors of a single-file checkpoint whose keys start with ``prefix``. ``keys_only`` skips reading
    .safetensors tensors (values are None). Pickles must already be allowed."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: None if keys_only else f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)  # allowed by allow_pickle
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _single_file_family(path: Path) -> str:
    try:
        keys = _read_checkpoint(path, keys_only=True)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"model.base: {path} is not a readable .safetensors checkpoint ({err})") from None
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"


def _sdxl_open_clip_encoder(path: Path, config_dir: str):
    """SDXL's second text encoder, read from the OpenCLIP keys of ``path`` with the config in
    ``config_dir``. diffusers picks a text encoder's keys by comparing widths, which cannot tell the
    two SDXL encoders apart when they are equally wide (as in tiny test models); this does not guess."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    prefix = "conditioner.embedders.1.model."
    config = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():  # parameters on the meta device; buffers stay real
        encoder = CLIPTextModelWithProjection(config)
    tensors = _read_checkpoint(path, prefix)
    state = convert_open_clip_checkpoint(encoder, tensors, prefix=prefix)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"model.base: {path}: second text encoder does not match {config_dir}/text_encoder_2 "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder.eval()


def _load_single_file(path: Path, config) -> tuple[str, dict]:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"model.base: {path} is not a .safetensors/.ckpt checkpoint")
    if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path, config)
    from personalize.models.family import FAMILIES

    family = _single_file_family(path)
    pipeline_cls = FAMILIES[family].pipeline_class
    kwargs = {}
    if config.single_file_config:
        kwargs = {"config": str(config.single_file_config), "local_files_only": True}
    try:
        if family == "sdxl" and config.single_file_config:
            kwargs["text_encoder_2"] = _sdxl_open_clip_encoder(path, str(config.single_file_config))
        pipe = pipeline_cls.from_single_file(str(path), safety_checker=None, **kwargs)
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers raises many types here; all mean the same to the user
        hint = ("" if config.single_file_config else
                " Offline, diffusers needs the model's configs: set model.single_file_config to a local "
                "diffusers folder of the same architecture.")
        raise ModelLoadError(f"model.base: could not load single file {path}: {err}.{hint}") from None
    components = {k: v for k, v in pipe.components.items() if v is not None}
    components["scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
    return family, components


def offline_message(repo_id: str, setting: str = "model.base", files: str = "",
                     alternative: str = " (or a single .safetensors file)") -> str:
    """What to do when ``repo_id`` is needed offline; ``setting`` is the option that takes a local copy
    (a recipe key, or a command-line flag such as ``--dino-weights``), ``files`` limits the download."""
    folder = repo_id.split("/")[-1]
    return (
        f"{setting}: the weights of '{repo_id}' are not on this machine and the Hugging Face Hub cannot be "
        f"reached. Download them where there is network (`hf download {repo_id}{files} --local-dir ./{folder}`), "
        f"copy the folder here and set {setting}=./{folder}{alternative}."
    )


def _hub_snapshot(repo_id: str, config) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=config.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        raise ModelLoadError(offline_message(repo_id))
    try:
        huggingface_hub.model_info(repo_id, revision=config.revision, timeout=10)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model.base: '{repo_id}' is neither a local path nor a model on the hub") from None
    except Exception:  # connection refused, DNS failure, timeout: one clear message, no retries
        raise ModelLoadError(offline_message(repo_id)) from None
    patterns = ["*.json", "*.txt", "*.safetensors"] + (["*.bin"] if config.allow_pickle else [])
    return Path(huggingface_hub.snapshot_download(repo_id, revision=config.revision, allow_patterns=patterns))


def load_vae(path: str) -> AutoencoderKL:
    """A separate AutoencoderKL (``model.vae``): its own folder, or a pipeline folder with ``vae/``."""
    folder = Path(path).expanduser()
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model.vae: {path} is not a diffusers AutoencoderKL folder (no config.json)")
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(f"model.vae: {folder} has no .safetensors weights")
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(f"model.vae: could not load {folder}: {err}") from None
