"""How much an in-context model uses its references, measured on toy-world validation subjects
(``val-N``: never trained on, and not the held-out ToyBench subjects).

- *Reference gain*: for each subject, one render is the target and K others (in other contexts) the
  references; the denoising loss at a few fixed timesteps with the references vs without them
  (the same model, the same noise). ``1 - loss_with / loss_without``, the mean over subjects.
- *Attention entropy*: the entropy of every reference-attention layer's weights over its
  K * h * w reference tokens, divided by ``log(K * h * w)``: 1 is a uniform average over the
  references (colors come through, the position of markings cannot), lower is sharper.

``python eval/incontext_probe.py MODEL [MODEL ...]`` prints both for each model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from personalize.incontext.attention import ReferenceAttnProcessor
from personalize.incontext.model import encode_references, predict_noise


@contextmanager
def recorded_entropy(unet, into: dict[str, list[float]]):
    """While active, each reference-attention layer appends the normalized entropy of its attention
    weights (mean over queries and heads) to ``into[layer name]``."""
    processors = {n.removesuffix(".processor"): p for n, p in unet.attn_processors.items()
                  if isinstance(p, ReferenceAttnProcessor)}

    def recording(name, processor):
        def attend(q, k, v):
            weights = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean().item()
            into.setdefault(name, []).append(entropy / math.log(k.shape[-2]))
            return type(processor).attend(processor, q, k, v)
        return attend

    for name, processor in processors.items():
        processor.attend = recording(name, processor)
    try:
        yield into
    finally:
        for processor in processors.values():
            del processor.attend


@torch.no_grad()
def probe(pipe, n_subjects: int = 24, timesteps=(200, 500, 800), seed: int = 0) -> dict:
    """Reference gain and per-layer attention entropy of ``pipe`` (an :class:`InContextPipeline` on
    the toy model) over validation subjects ``val-0 .. val-{n_subjects-1}``."""
    from personalize.toyworld.world import caption, render, sample_spec, validation_subject

    models, k = pipe.models, pipe.spec.num_references
    scheduler = models.noise_scheduler
    t = torch.tensor(list(timesteps))
    gains, entropy = [], {}
    for i in range(n_subjects):
        rng = np.random.default_rng([11, seed, i])
        subject = validation_subject(f"val-{i}")
        specs = []
        while len(specs) < k + 1:  # the target and its references in distinct scenes
            spec = sample_spec(rng, subject, p_no_scene=0.0)
            if spec.scene not in {s.scene for s in specs}:
                specs.append(spec)
        latents, _ = models.encode_images(pipe._pixels([Image.fromarray(render(s)) for s in specs]).to(pipe.device))
        latents = latents.float()
        reference = encode_references(models.unet, latents[1:], pipe._conditioning([caption(s) for s in specs[1:]]),
                                      k, pipe.spec.reference_timestep).repeat(len(t))
        target = latents[:1].repeat(len(t), 1, 1, 1)
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed * 1000 + i)).to(target)
        noisy = scheduler.add_noise(target, noise, t)
        text = pipe._conditioning([caption(specs[0])] * len(t))
        with recorded_entropy(models.unet, entropy):
            with_refs = (predict_noise(models.unet, noisy, t, text, reference).float() - noise).pow(2).mean().item()
        without = (predict_noise(models.unet, noisy, t, text, None).float() - noise).pow(2).mean().item()
        gains.append(1 - with_refs / without)
    return {"subjects": n_subjects, "timesteps": list(timesteps), "reference_gain": float(np.mean(gains)),
            "entropy": {name: float(np.mean(v)) for name, v in sorted(entropy.items())}}
