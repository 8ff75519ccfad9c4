"""ToyBench's judges: small networks trained on toy-world renders that score generated images.

- :class:`AttributeJudge` reads an image's object class, color, scene and accessory ("none" for a plain
  background or no accessory). It gives *prompt fidelity*: the fraction of generated images that show
  every attribute their prompt asked for.
- :class:`IdentityEmbedder` maps an image to an L2-normalized embedding of *which subject* it shows,
  whatever the scene, accessory, size or position. It is trained as a cosine classifier over many
  training subjects (never the held-out ones) and gives *subject fidelity*: the mean cosine between
  generated images and real renders of the subject, as DINO does in DreamBench.

Generated images are softer than renders, so both train on a mix of plain renders, renders through the
toy VAE (encode, decode) and lightly blurred renders. :class:`Judges` bundles the two with the metrics;
``eval/train_judges.py`` trains them and writes their accuracy to ``docs/judges.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from personalize.errors import ModelLoadError
from personalize.models.toy import TOY_JUDGES
from personalize.toyworld.world import (
    ACCESSORIES, CLASSES, COLORS, SCENES, SIZE, ImageSpec, render, sample_spec, training_subject,
)

NONE = "none"  # the label of a plain background (scene None) and of no accessory
VOCAB = {"class": CLASSES, "color": tuple(COLORS), "scene": (*SCENES, NONE), "accessory": (*ACCESSORIES, NONE)}
BLUR_SIGMA = (0.4, 1.0)  # pixels: the light blur of training images
# a shared trunk learns colors and scenes first and the class late: weighing the class loss 3x lifts the
# class accuracy after 300 steps from 50% to 83%
HEAD_LOSS_WEIGHTS = {"class": 3.0, "color": 1.0, "scene": 1.0, "accessory": 1.0}


# -- images ---------------------------------------------------------------------------------------

def to_tensor(images) -> torch.Tensor:
    """Images as a float tensor (N, 3, 64, 64) in [-1, 1], from uint8 arrays (N, H, W, 3) or (H, W, 3),
    PIL images (one or a list), or float tensors (N, 3, H, W) or (3, H, W) already in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images")
        if all(isinstance(image, torch.Tensor) for image in images):
            images = torch.stack(list(images))
        else:
            images = np.stack([np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
                               for image in images])
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3) pixels, got {images.dtype}")
        pixels = images[None] if images.ndim == 3 else images
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    elif isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise TypeError(f"tensor images must be float in [-1, 1], got {images.dtype}")
        x = (images[None] if images.ndim == 3 else images).detach().float().cpu()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected float images shaped (N, 3, H, W), got {tuple(images.shape)}")
    else:
        raise TypeError(f"cannot read images from {type(images).__name__}")
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images (N, 3, H, W) in [-1, 1] as uint8 pixels (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruct(vae, images, batch_size: int = 64, bf16: bool = True) -> np.ndarray:
    """``images`` through ``vae`` (mean latent, then decode) as uint8 pixels: how the VAE sees renders.
    ``bf16`` autocast is twice as fast on CPU, for training data."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def blur(images, sigma: float) -> np.ndarray:
    """uint8 images blurred with a Gaussian of ``sigma`` pixels."""
    return to_uint8(gaussian_blur(to_tensor(images), kernel_size=7, sigma=sigma))


# -- networks -------------------------------------------------------------------------------------

class AvgMaxPool(nn.Module):
    """Global average and max pooling side by side: averages tell colors and scenes, maxima tell that a
    shape's corner or a hat is somewhere (average pooling alone learns the object class far slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _backbone(width: int) -> nn.Sequential:
    """Six 3x3 conv layers, three of them stride 2 (64 -> 8 px), then pooling: ``8 * width`` features."""
    def conv(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    w = width
    return nn.Sequential(*conv(3, w, 2), *conv(w, w, 1), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w, 1),
                         *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w, 1), AvgMaxPool())


class AttributeJudge(nn.Module):
    """Images in [-1, 1] -> one logit vector per attribute head (class, color, scene, accessory)."""

    def __init__(self, width: int = 32, vocab: Optional[dict] = None):
        super().__init__()
        self.vocab = {head: tuple(names) for head, names in (vocab or VOCAB).items()}
        self.backbone = _backbone(width)
        self.heads = nn.ModuleDict({head: nn.Linear(8 * width, len(names)) for head, names in self.vocab.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {head: layer(features) for head, layer in self.heads.items()}


class IdentityEmbedder(nn.Module):
    """Images in [-1, 1] -> L2-normalized identity embeddings (N, dim)."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.backbone = _backbone(width)
        self.project = nn.Linear(8 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.backbone(x)).float(), dim=-1)


# -- training data --------------------------------------------------------------------------------

def spec_labels(spec: ImageSpec) -> dict[str, str]:
    """The attribute labels of a spec: a subject's color label is its base color, not its markings'."""
    return {"class": spec.cls, "color": spec.color, "scene": spec.scene or NONE, "accessory": spec.accessory or NONE}


@dataclass
class RenderedSet:
    """Renders with their labels; ``recon[recon_row[i]]`` is render ``i`` through the VAE (-1: none)."""
    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: dict[str, np.ndarray]  # head -> (N,) index into VOCAB[head]
    subject: np.ndarray  # (N,) training-subject label, -1 for generic objects and recolored subjects
    recon: Optional[np.ndarray]
    recon_row: np.ndarray


def render_training_set(n_subjects: int, renders_per_subject: int, n_objects: int, seed: int = 0,
                        progress: bool = True) -> RenderedSet:
    """Training subjects ``0..n_subjects-1`` in random scenes, accessories, sizes and positions, plus
    ``n_objects`` generic objects (a quarter of them recolored training subjects)."""
    rng = np.random.default_rng([4, seed])
    specs, subject_labels = [], []
    for i in range(n_subjects):
        subject = training_subject(i)
        for _ in range(renders_per_subject):
            specs.append(sample_spec(rng, subject, p_accessory=0.35, p_no_scene=0.15))
            subject_labels.append(i)
    for _ in range(n_objects):
        if rng.random() < 0.25:  # a property change: a training subject in another color
            subject = training_subject(int(rng.integers(n_subjects, 10**6)))
            color = str(rng.choice([c for c in COLORS if c != subject.color]))
            specs.append(sample_spec(rng, subject, color=color, p_accessory=0.35, p_no_scene=0.15))
        else:
            specs.append(sample_spec(rng, p_accessory=0.35, p_no_scene=0.15))
        subject_labels.append(-1)
    images = np.stack([render(s) for s in tqdm(specs, desc="rendering judge data", disable=not progress)])
    labels = {head: np.array([names.index(spec_labels(s)[head]) for s in specs]) for head, names in VOCAB.items()}
    return RenderedSet(images, labels, np.array(subject_labels), None, np.full(len(specs), -1))


def add_reconstructions(data: RenderedSet, vae, fraction: float = 0.4, seed: int = 0,
                        progress: bool = True) -> RenderedSet:
    """Put a random ``fraction`` of the renders through ``vae`` (the toy VAE of the model being judged)."""
    rows = np.sort(np.random.default_rng([9, seed]).choice(len(data.images), int(len(data.images) * fraction),
                                                           replace=False))
    chunks = range(0, len(rows), 256)
    data.recon = np.concatenate([reconstruct(vae, data.images[rows[i:i + 256]])
                                 for i in tqdm(chunks, desc="VAE reconstructions", disable=not progress)])
    data.recon_row = np.full(len(data.images), -1)
    data.recon_row[rows] = np.arange(len(rows))
    return data


def _sample_batch(data: RenderedSet, pool: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Rows from ``pool`` and their images: a third VAE reconstructions, a third blurred, randomly mirrored
    (the trainer's random_flip mirrors subjects too)."""
    recon_pool = pool[data.recon_row[pool] >= 0]
    n_recon = batch_size // 3 if len(recon_pool) else 0
    rows = np.concatenate([rng.choice(recon_pool, n_recon), rng.choice(pool, batch_size - n_recon)])
    x = to_tensor(np.concatenate([data.recon[data.recon_row[rows[:n_recon]]] if n_recon else data.images[:0],
                                  data.images[rows[n_recon:]]]))
    blurred = slice(n_recon, n_recon + batch_size // 3)
    x[blurred] = gaussian_blur(x[blurred], kernel_size=7, sigma=float(rng.uniform(*BLUR_SIGMA)))
    flip = torch.from_numpy(rng.random(batch_size) < 0.5)
    x[flip] = x[flip].flip(-1)
    return rows, x


def _fit(model: nn.Module, extra_params: list, loss_fn, steps: int, lr: float, desc: str, progress: bool) -> list:
    """AdamW with warm-up and cosine decay, bf16 autocast (2-3x faster convolutions on CPU); the loss per step.
    ``extra_params`` (a classifier's class centers) train without weight decay."""
    groups = [{"params": list(model.parameters())}, {"params": extra_params, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return losses


def train_attribute_judge(data: RenderedSet, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3,
                          width: int = 32, seed: int = 0, progress: bool = True) -> AttributeJudge:
    """Cross-entropy on every head (weighted by ``HEAD_LOSS_WEIGHTS``), over all renders of ``data``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([5, seed])
    model = AttributeJudge(width)
    pool = np.arange(len(data.images))
    targets = {head: torch.from_numpy(labels) for head, labels in data.labels.items()}

    def loss_fn():
        rows, x = _sample_batch(data, pool, batch_size, rng)
        logits = model(x)
        return sum(HEAD_LOSS_WEIGHTS[head] * F.cross_entropy(logits[head].float(), targets[head][rows])
                   for head in logits)

    _fit(model, [], loss_fn, steps, lr, "attribute judge", progress)
    return model.eval()


def train_identity_embedder(data: RenderedSet, steps: int = 2500, batch_size: int = 64, lr: float = 2e-3,
                            width: int = 32, dim: int = 128, scale: float = 16.0, margin: float = 0.2,
                            seed: int = 0, progress: bool = True) -> IdentityEmbedder:
    """A cosine classifier (CosFace: logits ``scale * (cos - margin at the true subject)``) over the training
    subjects of ``data``; only the embedder is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([6, seed])
    model = IdentityEmbedder(width, dim)
    pool = np.nonzero(data.subject >= 0)[0]
    labels = torch.from_numpy(data.subject)
    # small centers: Adam moves each by ~lr a step, so their direction turns fast enough though every
    # subject is in only a few batches
    centers = nn.Parameter(torch.randn(int(data.subject.max()) + 1, dim) * 0.01)

    def loss_fn():
        rows, x = _sample_batch(data, pool, batch_size, rng)
        cosine = model(x) @ F.normalize(centers, dim=-1).T
        target = labels[rows]
        cosine = cosine - margin * F.one_hot(target, len(centers))
        return F.cross_entropy(scale * cosine, target)

    _fit(model, [centers], loss_fn, steps, lr, "identity embedder", progress)
    return model.eval()


# -- the judges and the metrics -------------------------------------------------------------------

class Judges:
    """Both judges and ToyBench's metrics. ``report`` holds the judges' own measured accuracy."""

    def __init__(self, attribute: AttributeJudge, identity: IdentityEmbedder, report: Optional[dict] = None):
        self.attribute, self.identity = attribute.eval(), identity.eval()
        self.report = report or {}

    @classmethod
    def create(cls, width: int = 32, dim: int = 128) -> "Judges":
        """Untrained judges (seed torch first), for tests."""
        return cls(AttributeJudge(width), IdentityEmbedder(width, dim))

    @property
    def config(self) -> dict:
        """What :meth:`load` needs to rebuild the networks."""
        return {"attribute_width": self.attribute.backbone[0].out_channels, "vocab": self.attribute.vocab,
                "identity_width": self.identity.backbone[0].out_channels, "dim": self.identity.project.out_features}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Judges":
        """The judges saved in ``path`` (default: the shipped ones), a safetensors file with their config
        in its metadata. A missing file: FileNotFoundError; a file that is not judges: :class:`ModelLoadError`
        naming it."""
        from safetensors import SafetensorError

        path = Path(path or TOY_JUDGES)
        if not path.is_file():
            raise FileNotFoundError(f"no toy-world judges at {path}; train them with `python eval/train_judges.py` "
                                 "(needs the toy VAE, see docs/judges.md)")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({err}); give the judges file "
                                 "`python eval/train_judges.py` writes") from None
        try:
            config = json.loads(header["config"])
            attribute = AttributeJudge(config["attribute_width"], config["vocab"])
            identity = IdentityEmbedder(config["identity_width"], config["dim"])
            for prefix, module in (("attribute.", attribute), ("identity.", identity)):
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            report = json.loads(header.get("report", "{}"))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ModelLoadError(f"{path}: not a toy judges file ({type(err).__name__}: {first}); give the judges "
                                 "file `python eval/train_judges.py` writes") from None
        return cls(attribute, identity, report)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{prefix}.{k}": v.detach().contiguous() for prefix, module in
                   (("attribute", self.attribute), ("identity", self.identity)) for k, v in module.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(self.config), "report": json.dumps(self.report)})
        return path

    @torch.no_grad()
    def _batched(self, module: nn.Module, images, batch_size: int = 256):
        x = to_tensor(images)
        outputs = [module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        if isinstance(outputs[0], dict):
            return {head: torch.cat([o[head] for o in outputs]) for head in outputs[0]}
        return torch.cat(outputs)

    def attributes(self, images) -> list[dict]:
        """Per image: the predicted ``class``, ``color``, ``scene`` and ``accessory`` (None for "none")."""
        logits = self._batched(self.attribute, images)
        names = {head: [self.attribute.vocab[head][i] for i in logit.argmax(-1).tolist()]
                 for head, logit in logits.items()}
        n = len(next(iter(names.values())))
        return [{head: (None if names[head][i] == NONE else names[head][i]) for head in names} for i in range(n)]

    def attribute_accuracy(self, images, specs: Sequence[ImageSpec]) -> dict[str, float]:
        """Per head, the fraction of images whose predicted attribute is the spec's (scene and accessory
        included when the spec has none: the judge must then say "none")."""
        predicted = self.attributes(images)
        return {head: float(np.mean([(p[head] or NONE) == spec_labels(s)[head] for p, s in zip(predicted, specs)]))
                for head in VOCAB}

    def prompt_fidelity(self, images, specs: Sequence[ImageSpec]) -> float:
        """The fraction of images that show everything their spec's prompt asks for: the class and color,
        the scene if it names one and the accessory if it names one."""
        predicted = self.attributes(images)
        if len(predicted) != len(specs):
            raise ValueError(f"{len(predicted)} images but {len(specs)} specs")
        asked = [{"class": s.cls, "color": s.color, **({"scene": s.scene} if s.scene else {}),
                  **({"accessory": s.accessory} if s.accessory else {})} for s in specs]
        return float(np.mean([all(p[k] == v for k, v in a.items()) for p, a in zip(predicted, asked)]))

    def embed(self, images) -> torch.Tensor:
        """L2-normalized identity embeddings (N, dim)."""
        return self._batched(self.identity, images)

    def subject_fidelity(self, generated, references) -> float:
        """Mean cosine over all (generated, reference) pairs, like DreamBench's DINO score."""
        return float((self.embed(generated) @ self.embed(references).T).mean())

    def identify(self, queries, galleries: Sequence) -> torch.Tensor:
        """For each query image, the index of the gallery (a set of images of one subject) whose mean
        embedding is nearest in cosine."""
        means = torch.stack([F.normalize(self.embed(g).mean(0), dim=0) for g in galleries])
        return (self.embed(queries) @ means.T).argmax(-1)
