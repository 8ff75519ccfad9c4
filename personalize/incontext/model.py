"""The in-context model: a base U-Net, its own encoder half as the reference encoder, and the
reference attention layers (:mod:`personalize.incontext.attention`); saving and loading the added
weights with what they were trained on.

Reference encoder: the U-Net's ``conv_in``, time embedding at a fixed reference timestep, down blocks
and mid block, run on the *clean* latents of the K examples, each conditioned on its own caption. At
each resolution the deepest encoder feature is kept, and the K examples' features are concatenated
along the token axis: ``tokens[h * w]`` has shape (batch, K * h * w, channels).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from personalize.models.loading import ModelLoadError
from personalize.utils.files import read_json
from personalize.incontext.names import BLOCK_GROUPS, QUERY_MODES
from personalize.incontext.attention import (
    ReferenceFeatures, install_reference_attention, reference_parameters,
    reference_state_dict,
)

WEIGHTS_NAME = "incontext_weights.safetensors"
CONFIG_NAME = "incontext_config.json"
DEFAULT_REF_SCALE = 2.0  # reference guidance scale for a model whose config names no ref_scale of its own
MAX_CONFIG_BYTES = 1 << 20  # an in-context config is a few hundred bytes


class InContextLoadError(ModelLoadError):
    """In-context weights that are missing, unreadable or made for another base model."""


@dataclass
class InContextSpec:
    """What the added weights need from the base model, and how they were trained."""
    family: str = "sd"
    blocks: list[str] = field(default_factory=lambda: ["up"])
    num_references: int = 3  # K used in training; more at generation time only if the user allows it
    reference_timestep: int = 0
    reference_query: str = "shared"  # how the reference attention makes its query (attention.QUERY_MODES)
    unet_signature: dict = field(default_factory=dict)
    lora: Optional[dict] = None  # peft LoraConfig fields when the U-Net also carries LoRA
    base: Optional[str] = None  # the base model it was trained on (personalize zero-shot's default)
    ref_scale: Optional[float] = None  # the reference guidance scale chosen for it on validation subjects
    #                                    (written when it is shipped; the default at generation time)

    @property
    def default_ref_scale(self) -> float:
        """The reference scale generation uses when none is given: ``ref_scale``, else :data:`DEFAULT_REF_SCALE`."""
        return self.ref_scale if self.ref_scale is not None else DEFAULT_REF_SCALE

    @classmethod
    def from_config(cls, values: Any, source: str | Path = CONFIG_NAME) -> "InContextSpec":
        """The spec ``values`` (a loaded ``incontext_config.json``) describe, checked as a recipe section is:
        an unknown key is refused naming it and the closest valid one, a wrong type or an impossible value
        naming the key; :class:`InContextLoadError` naming ``source``."""
        if not isinstance(values, dict):
            raise InContextLoadError(f"{source}: an in-context config is a JSON object, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(names)}"
                raise InContextLoadError(f"{source}: unknown key {key!r}{hint}")
        problems = [f"{key}: {problem}" for key, value in values.items()
                    if (problem := _SPEC_CHECKS[key](value)) is not None]
        if problems:
            raise InContextLoadError(f"{source}: " + "; ".join(problems))
        if values.get("ref_scale") is not None:
            values = {**values, "ref_scale": float(values["ref_scale"])}
        return cls(**values)

    @staticmethod
    def signature(unet) -> dict:
        c = unet.config
        return {"block_out_channels": list(c.block_out_channels), "cross_attention_dim": c.cross_attention_dim,
                "in_channels": c.in_channels, "down_block_types": list(c.down_block_types),
                "up_block_types": list(c.up_block_types)}


def _families() -> tuple[str, ...]:
    from personalize.models.family import FAMILIES

    return tuple(FAMILIES)


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_blocks(value) -> Optional[str]:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of block groups ({', '.join(BLOCK_GROUPS)}), got {value!r}"
    bad = [v for v in value if v not in BLOCK_GROUPS]
    if bad:
        return f"unknown block group(s) {', '.join(map(repr, bad))}; choose from {', '.join(BLOCK_GROUPS)}"
    if len(set(value)) != len(value):
        return f"a block group is named twice in {value!r}"
    return None


def _check_lora(value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return f"expected null or a mapping of LoRA options, got {value!r}"
    if not _is_int(value.get("r"), 1):
        return f"'r' (the LoRA rank) must be a whole number of at least 1, got {value.get('r')!r}"
    targets = value.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        return f"'target_modules' must be a non-empty list of module names, got {targets!r}"
    if "lora_alpha" in value and not _is_number(value["lora_alpha"]):
        return f"'lora_alpha' must be a number, got {value['lora_alpha']!r}"
    return None


def _check_signature(value) -> Optional[str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return f"expected a mapping (the base U-Net's signature), got {value!r}"
    return None


_SPEC_CHECKS = {  # InContextSpec field -> a check of a value from a config file: None or what is wrong
    "family": lambda v: None if v in _families() else f"expected one of {', '.join(_families())}, got {v!r}",
    "blocks": _check_blocks,
    "num_references": lambda v: None if _is_int(v, 1) else f"expected a whole number of at least 1, got {v!r}",
    "reference_timestep": lambda v: None if _is_int(v, 0) else f"expected a whole number >= 0, got {v!r}",
    "reference_query": lambda v: None if v in QUERY_MODES else f"expected one of {', '.join(QUERY_MODES)}, got {v!r}",
    "unet_signature": _check_signature,
    "lora": _check_lora,
    "base": lambda v: None if v is None or (isinstance(v, str) and v) else f"expected null or a model name, got {v!r}",
    "ref_scale": lambda v: None if v is None or _is_number(v) else f"expected null or a finite number, got {v!r}",
}


def encode_references(unet, latents: torch.Tensor, conditioning: dict, num_references: int,
                      timestep: int = 0) -> ReferenceFeatures:
    """Reference features of ``latents`` (batch * K, c, h, w; clean, in the U-Net's latent scale), each
    conditioned on its own caption (``conditioning``: ``unet(...)`` keyword arguments for batch * K
    samples, as :meth:`Family.unet_conditioning` makes them)."""
    n = latents.shape[0]
    if n % num_references:
        raise ValueError(f"{n} reference latents are not a whole number of groups of {num_references}")
    text = conditioning["encoder_hidden_states"]
    added = conditioning.get("added_cond_kwargs")
    timesteps = torch.full((n,), timestep, device=latents.device, dtype=torch.long)
    emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timesteps), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added or {})
    sample = unet.conv_in(latents)
    deepest: dict[int, torch.Tensor] = {}
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=text)
        else:
            sample, res_samples = block(hidden_states=sample, temb=emb)
        for feature in res_samples:  # later features at a resolution are deeper
            deepest[feature.shape[-2] * feature.shape[-1]] = feature
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=text)
        else:
            sample = unet.mid_block(sample, emb)
        deepest[sample.shape[-2] * sample.shape[-1]] = sample
    batch = n // num_references
    tokens = {}
    for size, feature in deepest.items():
        c = feature.shape[1]
        tokens[size] = (feature.reshape(batch, num_references, c, size).permute(0, 1, 3, 2)
                        .reshape(batch, num_references * size, c))
    return ReferenceFeatures(tokens)


def predict_noise(unet, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                  reference: Optional[ReferenceFeatures]) -> torch.Tensor:
    """The U-Net's output for ``noisy`` with the text ``conditioning`` and the references (None: the
    base model's prediction)."""
    kwargs = {"cross_attention_kwargs": {"reference": reference}} if reference is not None else {}
    return unet(noisy, timesteps, **conditioning, **kwargs).sample


# -- the added weights on disk --------------------------------------------------------------------

def save_incontext(unet, spec: InContextSpec, out_dir: str | Path) -> list[Path]:
    """``incontext_weights.safetensors`` (reference layers, and LoRA weights if the U-Net has them)
    and ``incontext_config.json`` (the spec, with the base U-Net's signature)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = reference_state_dict(unet)
    if spec.lora is not None:
        from peft.utils import get_peft_model_state_dict

        state.update({f"lora.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()})
    spec = InContextSpec(**{**asdict(spec), "unet_signature": InContextSpec.signature(unet)})
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "personalize-incontext"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(spec), indent=2))
    return [out_dir / WEIGHTS_NAME, out_dir / CONFIG_NAME]


def read_spec(path: str | Path) -> InContextSpec:
    """The spec in ``path/incontext_config.json``, checked (:meth:`InContextSpec.from_config`): a file that
    is not UTF-8 JSON, or that names an unknown key, a wrong type or an impossible value, is an
    :class:`InContextLoadError` naming the file and the key."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise InContextLoadError(f"{path}: no {CONFIG_NAME} (an in-context model folder has {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME}, written by `personalize train` with method incontext)")
    values = read_json(config_file, InContextLoadError, "an in-context config", MAX_CONFIG_BYTES)
    return InContextSpec.from_config(values, config_file)


def load_incontext(unet, path: str | Path, family: str, grow: bool = False,
                   lora: Optional[dict] = None) -> InContextSpec:
    """Install reference attention (and LoRA, if it was trained with it) on ``unet`` and load the
    weights saved in ``path``; refuses weights made for another base model family or U-Net shape.

    ``grow``: ``unet`` already carries reference attention in more block groups than ``path`` has
    (and may carry LoRA that ``path`` lacks); the saved layers are loaded into their places and the
    others keep their zero-initialized outputs, so the grown model starts as the saved one. ``lora``
    (with ``grow``): the LoRA config to add instead of the saved one, with the same rank on a superset
    of its target modules; the modules the saved model lacks start with B = 0."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    spec = read_spec(path)
    if spec.family != family:
        raise InContextLoadError(f"{path}: these in-context weights were trained on an {spec.family} model; the "
                                 f"base model is {family}")
    signature = InContextSpec.signature(unet)
    if spec.unet_signature and spec.unet_signature != signature:
        diff = {k: (spec.unet_signature.get(k), v) for k, v in signature.items() if spec.unet_signature.get(k) != v}
        raise InContextLoadError(f"{path}: made for another U-Net (trained on / this base): {diff}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise InContextLoadError(f"{weights}: missing (an in-context model folder has {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME})")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise InContextLoadError(f"{weights}: cannot read in-context weights: truncated, damaged or not "
                                 f"safetensors ({err})") from None
    try:
        install_reference_attention(unet, spec.blocks, spec.reference_query)
    except ValueError as err:
        raise InContextLoadError(f"{path / CONFIG_NAME}: blocks {spec.blocks}: {err}") from None
    if spec.lora is not None:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        if lora is not None and not (grow and lora.get("r") == spec.lora.get("r")
                                     and set(spec.lora["target_modules"]) <= set(lora["target_modules"])):
            raise InContextLoadError(f"{path}: its LoRA (rank {spec.lora.get('r')}, modules "
                                     f"{spec.lora['target_modules']}) cannot grow into {lora}")
        try:
            unet.add_adapter(LoraConfig(**(lora or spec.lora)))
        except (TypeError, ValueError) as err:
            raise InContextLoadError(f"{path / CONFIG_NAME}: lora {lora or spec.lora}: not a LoRA config this "
                                     f"U-Net takes ({err})") from None
        saved = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        try:
            result = set_peft_model_state_dict(unet, saved)
        except (RuntimeError, ValueError, KeyError) as err:
            raise InContextLoadError(f"{path / WEIGHTS_NAME}: LoRA weights that do not fit this U-Net "
                                     f"({' '.join(str(err).split())[:300]})") from None
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise InContextLoadError(f"{path / WEIGHTS_NAME}: LoRA weights that fit no module of this U-Net: "
                                     f"{unexpected[:3]}")
    own = reference_state_dict(unet)
    given = {k: v for k, v in state.items() if not k.startswith("lora.")}
    if set(own) != set(given) and not (grow and set(given) <= set(own)):
        missing, extra = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        raise InContextLoadError(f"{path / WEIGHTS_NAME}: reference layers do not match this U-Net "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in given.items():
            if params[name].shape != value.shape:
                raise InContextLoadError(f"{path / WEIGHTS_NAME}: {name} has shape {tuple(value.shape)}, this U-Net "
                                         f"needs {tuple(params[name].shape)}")
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise InContextLoadError(f"{path / WEIGHTS_NAME}: {name} is not finite floating-point weights "
                                         f"({value.dtype}); the file is damaged")
            params[name].copy_(value)
    return spec


__all__ = ["InContextSpec", "InContextLoadError", "encode_references", "predict_noise", "save_incontext",
           "load_incontext", "read_spec", "install_reference_attention", "reference_parameters"]
