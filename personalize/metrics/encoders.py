"""DreamBench's image and text encoders as metrics: DINO ViT-S/16 and CLIP ViT-B/32 (open_clip), their
weights (local, cached, or tiny random stand-ins for offline smoke runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from personalize.models.loading import offline_message

from personalize.metrics.base import (
    CLIP_FILES, CLIP_MODEL, CLIP_REPO, DINO_REPO, IMAGENET_MEAN, IMAGENET_STD, PICKLE_SUFFIXES, MetricWeightsError,
    SubjectMetrics, as_pil,
)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _EncoderMetrics(SubjectMetrics):
    """An image encoder behind a torchvision-style ``preprocess`` (PIL -> tensor)."""

    def __init__(self, preprocess, device=None, batch_size: int = 32):
        self.preprocess, self.batch_size = preprocess, batch_size
        self.device = torch.device(device) if device else _default_device()

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("no images")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(as_pil(im)) for im in images[start:start + self.batch_size]])
            out.append(self._encode_images(pixels.to(self.device)).float().cpu())
        return torch.cat(out)


# -- DINO -----------------------------------------------------------------------------------------

def dino_transform(image_size: int = 224):
    """DINO's evaluation transform (``eval_knn.py``): resize to 256/224 of the crop, bicubic; center crop;
    ImageNet normalization."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(image_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class DinoMetric(_EncoderMetrics):
    """DINO: the class token of a DINO ViT (``transformers.ViTModel``, no pooler) as the global embedding."""

    image_metric = "dino"

    def __init__(self, model, device=None, batch_size: int = 32):
        size = model.config.image_size
        super().__init__(dino_transform(size if isinstance(size, int) else size[0]), device, batch_size)
        self.model = model.eval().to(self.device)

    def _encode_images(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    @classmethod
    def load(cls, weights: Optional[str] = None, device=None, allow_pickle: bool = False) -> "DinoMetric":
        """``weights``: a local folder saved by transformers, or a hub id (default facebook/dino-vits16).
        The folder's ``model.safetensors`` is read; its ``pytorch_model.bin`` (a pickle) only with
        ``allow_pickle``."""
        from transformers import ViTModel

        folder = resolve_weights(weights, DINO_REPO, "--dino-weights")
        if not folder.is_dir():
            raise MetricWeightsError(f"--dino-weights: {folder} is a file; give the folder transformers saved "
                                     "(config.json and model.safetensors) or a hub id")
        if not any(folder.glob("*.safetensors")) and not allow_pickle:
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise MetricWeightsError(
                f"--dino-weights: {folder} has no .safetensors weights" + (
                    f", only {', '.join(pickled)}: a pickle, which can run code when loaded. Convert it to "
                    "safetensors (facebook/dino-vits16 has model.safetensors at revision refs/pr/1: `hf download "
                    "facebook/dino-vits16 --revision refs/pr/1`), or pass --allow-pickle if you trust it"
                    if pickled else ""))
        try:
            model, info = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, output_loading_info=True,
                                                   use_safetensors=None if allow_pickle else True)
        except Exception as err:  # transformers' errors for a damaged or foreign folder vary by version
            raise MetricWeightsError(f"--dino-weights: could not load a DINO ViT from {folder}: "
                                     f"{_first_line(err)}") from None
        missing = info.get("missing_keys") or []
        if missing:  # transformers would leave them random: scores from such a model mean nothing
            raise MetricWeightsError(f"--dino-weights: {folder} is not a DINO ViT: its weights lack {len(missing)} of "
                                     f"the model's tensors ({', '.join(sorted(missing)[:3])}, ...)")
        metric = cls(model, device)
        metric.weights = str(folder)
        return metric


# -- CLIP -----------------------------------------------------------------------------------------

class ClipMetric(_EncoderMetrics):
    """CLIP-I and CLIP-T with an open_clip model, its evaluation ``preprocess`` and its tokenizer."""

    image_metric, text_metric = "clip_i", "clip_t"

    def __init__(self, model, preprocess, tokenizer, device=None, batch_size: int = 32):
        super().__init__(preprocess, device, batch_size)
        self.model, self.tokenizer = model.eval().to(self.device), tokenizer

    def _encode_images(self, pixels):
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float().cpu()

    @classmethod
    def load(cls, weights: Optional[str] = None, model_name: str = CLIP_MODEL, device=None,
             allow_pickle: bool = False) -> "ClipMetric":
        """``weights``: an open_clip checkpoint (.safetensors; a .bin state dict only with ``allow_pickle``),
        a folder holding one, or None for the OpenAI weights of ViT-B/32 (from the Hugging Face cache or the
        hub)."""
        import open_clip

        files = CLIP_FILES if allow_pickle else CLIP_FILES[:1]
        if weights is None and model_name == CLIP_MODEL:
            path = resolve_weights(None, CLIP_REPO, "--clip-weights", files=files)
        elif weights is None:
            raise MetricWeightsError(f"--clip-weights: {model_name} has no default weights; pass a checkpoint")
        else:
            path = resolve_weights(weights, CLIP_REPO, "--clip-weights", files=files)
        if path.is_dir():
            found = [path / f for f in files if (path / f).is_file()] or sorted(path.glob("*.safetensors"))
            if not found:
                raise MetricWeightsError(f"--clip-weights: {path} holds none of {', '.join(files)}" + (
                    " (pickled .bin weights are read only with --allow-pickle)" if not allow_pickle else ""))
            path = found[0]
        if path.suffix != ".safetensors" and not allow_pickle:
            raise MetricWeightsError(f"--clip-weights: {path} is not a .safetensors file; a pickled checkpoint can "
                                     "run code when loaded. Convert it to safetensors, or pass --allow-pickle if you "
                                     "trust it (it is then read with torch.load(weights_only=True))")
        try:  # the OpenAI weights were trained with QuickGELU; open_clip's ViT-B-32 config does not say so
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), force_quick_gelu=True, weights_only=True)
        except Exception as err:  # safetensors, torch's weights-only unpickler, state-dict mismatches
            raise MetricWeightsError(f"--clip-weights: could not load {model_name} weights from {path}: "
                                     f"{_first_line(err)}") from None
        metric = cls(model, preprocess, open_clip.get_tokenizer(model_name), device)
        metric.weights = str(path)
        return metric


# -- weights --------------------------------------------------------------------------------------

def _first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message, its first line cut to ``limit`` characters (state-dict errors list every key)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _offline() -> bool:
    flags = (os.environ.get(k, "0").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in {"1", "true", "yes"} for flag in flags)


def resolve_weights(source: Optional[str], repo_id: str, setting: str, files: Sequence[str] = ()) -> Path:
    """A local path for ``source`` (a file, a folder, or a hub id; None = ``repo_id``): the path itself,
    the Hugging Face cache, or a download. Offline without a local copy: one error that says what is
    missing and how to supply it. ``files``: the hub files wanted (any one of them); default all."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if source is not None:
        path = Path(source).expanduser()
        if path.exists():
            return path
        if source.startswith((".", "/", "~")) or path.suffix or source.count("/") != 1:
            raise MetricWeightsError(f"{setting}: {source} does not exist")
        repo_id = source

    def fetch(local_only: bool) -> Path:
        if not files:
            return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=local_only,
                                                          allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
        for i, name in enumerate(files):
            try:
                return Path(huggingface_hub.hf_hub_download(repo_id, name, local_files_only=local_only))
            except Exception:
                if i == len(files) - 1:
                    raise
        raise AssertionError  # unreachable

    try:
        return fetch(local_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    what = f" {files[0]}" if files else ""
    message = offline_message(repo_id, setting, what, " (the folder or the file)" if files else "")
    if _offline():
        raise MetricWeightsError(message)
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise MetricWeightsError(f"{setting}: '{repo_id}' is neither a local path nor a model on the hub") from None
    except Exception:  # no network: one clear message, no retries
        raise MetricWeightsError(message) from None
    return fetch(local_only=False)


# -- tiny random encoders (tests, CPU smoke runs: the numbers mean nothing) --------------------------

def tiny_dino(seed: int = 0, device=None) -> DinoMetric:
    """DINO's code path over a tiny random ``ViTModel`` (32 px, 2 layers)."""
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    metric = DinoMetric(model, device)
    metric.weights = f"tiny random, seed {seed}"
    return metric


TINY_CLIP_CONFIG = {"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def tiny_clip(seed: int = 0, device=None) -> ClipMetric:
    """CLIP's code path over a tiny random open_clip ``CLIP`` with the real tokenizer and preprocessing."""
    import open_clip
    from open_clip.model import CLIP

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIP(**TINY_CLIP_CONFIG)
    preprocess = open_clip.image_transform(TINY_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    metric = ClipMetric(model, preprocess, open_clip.get_tokenizer(CLIP_MODEL), device)
    metric.weights = f"tiny random, seed {seed}"
    return metric
