"""Export a :class:`~personalize.models.Models` bundle as ONE ``.safetensors`` file in the original
Stable Diffusion (LDM / CompVis) key layout, the layout A1111, ComfyUI and diffusers'
``StableDiffusionPipeline.from_single_file`` / ``StableDiffusionXLPipeline.from_single_file`` read.

Layout written:

* U-Net under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``);
* VAE under ``first_stage_model.``; its mid-block attention projections as 1x1 conv weights;
* SD 1.x text encoder under ``cond_stage_model.transformer.`` (Hugging Face CLIP names);
* SD 2.x text encoder (OpenCLIP ViT-H in the original) under ``cond_stage_model.model.`` in OpenCLIP
  names. A ``sd`` model counts as SD 2.x when its U-Net uses linear transformer projections
  (``use_linear_projection``), as SD 2.x does and SD 1.x does not. diffusers' SD 2 text encoder
  keeps 23 of OpenCLIP's 24 layers (SD 2 uses the penultimate layer), so 23 are written; tools that
  build the full 24-layer model leave the unused last layer at its initial values. SD 2's text
  encoder has no projection, so no ``text_projection`` is written;
* SDXL: first text encoder under ``conditioner.embedders.0.transformer.`` (Hugging Face CLIP
  names), second under ``conditioner.embedders.1.model.`` (OpenCLIP names: q/k/v concatenated into
  ``in_proj_weight`` / ``in_proj_bias``, ``text_projection`` = the transposed projection weight).

v-prediction models also get an empty ``v_pred`` tensor, the marker ComfyUI reads for SDXL.
The key maps are derived from the modules' own state-dict keys, so any number of blocks, layers and
transformer depths works (the built-in tiny models as well as real SD 1.5 / 2.x / SDXL shapes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D parameter names -> LDM ResBlock names (U-Net).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
               "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# diffusers VAE attention names -> LDM AttnBlock names.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Hugging Face CLIP encoder-layer names -> OpenCLIP resblock names (q/k/v are handled separately).
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _indices(keys: list[str], pattern: str) -> dict[int, set[int]]:
    """For ``pattern`` with two integer groups (block, item): {block: {items}} over ``keys``."""
    found: dict[int, set[int]] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    return found


def _refuse_adapters(keys: Iterable[str]) -> None:
    adapters = [k for k in keys if ".lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(f"{adapters[0]!r} belongs to an unmerged (LoRA) adapter; merge it into the weights "
                         "(e.g. peft's merge_and_unload) before exporting a single file")


def ldm_unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Map diffusers ``UNet2DConditionModel`` state-dict keys to LDM keys (without ``model.diffusion_model.``).

    LDM numbers the U-Net as flat sequences: ``input_blocks.0`` is ``conv_in``; then, per down block,
    one ``input_blocks`` entry per resnet (``.0`` resnet, ``.1`` its attention) and one for the
    downsampler (``.0.op``); ``middle_block`` alternates resnet / attention; ``output_blocks`` has one
    entry per up-block resnet (``.0`` resnet, ``.1`` attention) and the upsampler follows the block's
    last resnet (``.1.conv``, or ``.2.conv`` after an attention). Block sizes are read from the keys.
    Raises ``ValueError`` on a key it cannot place (e.g. unmerged LoRA adapter weights).
    """
    keys = list(keys)
    _refuse_adapters(keys)
    down_res = _indices(keys, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    down_samplers = {int(m[1]) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", k))}
    up_res = _indices(keys, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
    up_attn = _indices(keys, r"up_blocks\.(\d+)\.attentions\.(\d+)\.")

    input_start, n = {}, 1  # first input_blocks index of each down block
    for b in sorted(down_res):
        input_start[b] = n
        n += len(down_res[b]) + (b in down_samplers)
    output_start, n = {}, 0
    for b in sorted(up_res):
        output_start[b] = n
        n += len(up_res[b])

    def resnet(prefix: str, rest: str) -> str:
        name, _, tail = rest.partition(".")
        if name not in _UNET_RESNET:
            raise ValueError(f"U-Net resnet parameter {rest!r} has no place in the original SD layout")
        return f"{prefix}.{_UNET_RESNET[name]}.{tail}"

    mapping = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            mapping[key] = f"{_UNET_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            idx = input_start[int(m[1])] + int(m[3])
            mapping[key] = resnet(f"input_blocks.{idx}.0", m[4]) if m[2] == "resnets" \
                else f"input_blocks.{idx}.1.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            mapping[key] = f"input_blocks.{input_start[b] + len(down_res[b])}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            idx = 2 * int(m[2]) + (m[1] == "attentions")
            mapping[key] = resnet(f"middle_block.{idx}", m[3]) if m[1] == "resnets" \
                else f"middle_block.{idx}.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            idx = output_start[int(m[1])] + int(m[3])
            mapping[key] = resnet(f"output_blocks.{idx}.0", m[4]) if m[2] == "resnets" \
                else f"output_blocks.{idx}.1.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            idx = output_start[b] + len(up_res[b]) - 1
            mapping[key] = f"output_blocks.{idx}.{2 if up_attn.get(b) else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"U-Net key {key!r} has no place in the original SD layout "
                             "(merge adapters into the weights before exporting a single file)")
    return mapping


def ldm_vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Map diffusers ``AutoencoderKL`` keys to LDM keys (without ``first_stage_model.``).

    LDM numbers decoder up blocks from the lowest resolution upwards in reverse (diffusers'
    ``up_blocks.0`` is LDM's ``up.{n-1}``); mid resnets are ``block_1`` / ``block_2``.
    """
    keys = list(keys)
    n_up = len({int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    mapping = {}
    for key in keys:
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            ldm = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|(post_)?quant_conv)\.[^.]+", key):
            ldm = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            ldm = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            ldm = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            ldm = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\."
                               r"(group_norm|to_[qkv]|to_out\.0)\.(.+)", key):
            ldm = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
        else:
            raise ValueError(f"VAE key {key!r} has no place in the original SD layout")
        mapping[key] = ldm.replace("conv_shortcut", "nin_shortcut")
    return mapping


def _hf_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP state dict with the ``text_model.`` prefix the original checkpoints use
    (recent transformers flatten ``CLIPTextModel`` and drop it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items()}


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face CLIP text model state dict to OpenCLIP names (no prefix)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            i, param = m[1], m[2]
            qkv = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        elif re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            continue  # concatenated with q above
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _OPEN_CLIP_LAYER:
                raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        elif key != "embeddings.position_ids":
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    return out


def _is_sd2(models) -> bool:
    return models.family.name == "sd" and bool(getattr(models.unet.config, "use_linear_projection", False))


def ldm_state_dict(models) -> dict[str, torch.Tensor]:
    """The whole model as one state dict in the original SD layout (tensors not copied where possible)."""
    out: dict[str, torch.Tensor] = {}
    unet = models.unet.state_dict()
    for key, ldm in ldm_unet_key_map(unet).items():
        out[UNET_PREFIX + ldm] = unet[key]
    vae = models.vae.state_dict()
    for key, ldm in ldm_vae_key_map(vae).items():
        value = vae[key]
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM AttnBlock uses 1x1 convolutions
        out[VAE_PREFIX + ldm] = value
    encoders = [e.state_dict() for e in models.text_encoders]
    if models.family.name == "sdxl":
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in _hf_clip(encoders[0]).items()})
        out.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_state_dict(encoders[1]).items()})
    elif _is_sd2(models):
        out.update({SD2_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_state_dict(encoders[0]).items()})
    else:
        out.update({SD1_CLIP_PREFIX + k: v for k, v in _hf_clip(encoders[0]).items()})
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    _refuse_adapters(out)
    if models.noise_scheduler.config.get("prediction_type") == "v_prediction":
        out["v_pred"] = torch.tensor([])
    return out


def save_single_file(models, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``models`` to ``path`` as one ``.safetensors`` checkpoint in the original SD layout.

    ``dtype`` (e.g. ``torch.float16``) casts the floating-point weights; default: keep each tensor's
    dtype. Returns the path written. diffusers loads it back with
    ``StableDiffusion(XL)Pipeline.from_single_file(path, config=<diffusers folder of the same model>)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors, not {path.name}")
    tensors = {}
    for key, value in ldm_state_dict(models).items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
