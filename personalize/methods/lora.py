"""LoRA (Hu et al. 2021) through peft on the U-Net's attention (and optionally the text encoders),
with optional prior preservation (DreamBooth-LoRA). Exports diffusers' ``pytorch_lora_weights.safetensors``
(loads with ``pipe.load_lora_weights``) and, on request, ``pytorch_lora_weights_kohya.safetensors`` in the
kohya key format that A1111, ComfyUI, kohya's sd-scripts and diffusers' kohya converter read.
:func:`load_lora` loads either into a pipeline, refusing pickles and files made for another model."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from personalize.config import ConfigError
from personalize.errors import ModelLoadError, UserError
from personalize.methods.options import LoRAConfig
from personalize.methods.registry import register_method
from personalize.methods.base import Method

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig

    def _peft_config(self, rank: int, targets: list[str]) -> LoraConfig:
        alpha = self.options.alpha if self.options.alpha is not None else rank
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=self.options.dropout,
                          init_lora_weights="gaussian", target_modules=targets)

    def setup(self, models) -> None:
        super().setup(models)
        opts = self.options
        try:
            models.unet.add_adapter(self._peft_config(opts.rank, opts.target_modules))
        except ValueError as err:
            raise ConfigError(f"lora.target_modules: {err}") from None
        self.trains_text_encoder = opts.train_text_encoder
        if self.trains_text_encoder:
            for encoder in models.text_encoders:
                encoder.add_adapter(self._peft_config(opts.text_encoder_rank or opts.rank,
                                                      opts.text_encoder_target_modules))
        if opts.export_kohya:
            kohya_state_dict(models, self.trains_text_encoder)  # every adapted module has a kohya name, before training

    def trainable_modules(self):
        modules = {"unet": self.models.unet}
        if self.trains_text_encoder:
            for i, encoder in enumerate(self.models.text_encoders):
                modules[f"text_encoder{'_' + str(i + 1) if i else ''}"] = encoder
        return modules

    def trainable_parameters(self):
        groups = [{"params": [p for p in self.models.unet.parameters() if p.requires_grad]}]
        if self.trains_text_encoder:
            lr = self.options.text_encoder_learning_rate or self.config.train.learning_rate
            params = [p for e in self.models.text_encoders for p in e.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": lr})
        return groups

    def export(self, models, out_dir: Path) -> list[Path]:
        kwargs = {
            "unet_lora_layers": diffusers_lora_layers(models.unet),
            "unet_lora_adapter_metadata": models.unet.peft_config["default"].to_dict(),
        }
        if self.trains_text_encoder:
            names = ["text_encoder", "text_encoder_2"]
            for name, encoder in zip(names, models.text_encoders):
                kwargs[f"{name}_lora_layers"] = diffusers_lora_layers(encoder)
                kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        models.family.pipeline_class.save_lora_weights(out_dir, **kwargs)
        written = [out_dir / DIFFUSERS_FILE]
        if self.options.export_kohya:
            written.append(save_kohya(models, self.trains_text_encoder, out_dir / KOHYA_FILE))
        return written


def diffusers_lora_layers(module) -> dict[str, torch.Tensor]:
    """``module``'s LoRA tensors for ``save_lora_weights``: in diffusers' naming where its converter
    renames every layer (attention layers, as diffusers' training scripts write), otherwise in peft's own
    naming, which diffusers also reads (a file mixing the two loses layers in diffusers' loader)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = get_peft_model_state_dict(module)
    converted = convert_state_dict_to_diffusers(dict(state))
    return dict(state) if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted


# -- the kohya / A1111 / ComfyUI file ---------------------------------------------------------------
# Each part (the U-Net, each text encoder) is converted from its own peft state, so one part's naming
# never decides another's. Keys: ``PREFIX + module path with "_" + .lora_down.weight / .lora_up.weight /
# .alpha`` (alpha as trained: loaders scale by alpha / rank). The U-Net's module path is diffusers' for
# SD 1.x / 2.x (kohya's own SD 1.x naming) and the original-SD "input_blocks" path for SDXL (kohya's
# SDXL naming); A1111, ComfyUI and diffusers' kohya converter read both. Text encoders: ``lora_te_``
# (one encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL), each with ``text_model_`` as in the CLIP
# checkpoints those tools key on (transformers 5 flattens ``CLIPTextModel`` and drops it).

_CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def lora_layers(module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path: (lora_A weight, lora_B weight, alpha)}`` from ``module``'s own peft state dict."""
    state = dict(get_peft_model_state_dict(module))
    layers = {}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        path = key[: -len(".lora_A.weight")]
        down, up = state.pop(key), state.pop(f"{path}.lora_B.weight")
        layers[path] = (down, up, float(module.get_submodule(path).lora_alpha["default"]))
    if state:
        raise ConfigError(f"lora.export_kohya: the kohya format has no place for {sorted(state)[:3]}")
    return layers


def kohya_unet_paths(unet, paths: list[str], family: str) -> dict[str, str]:
    """The U-Net module path kohya names each of ``paths`` (diffusers paths) by: the path itself for
    SD 1.x / 2.x, the original-SD path of the single-file export's key map for SDXL."""
    if family != "sdxl":
        return {path: path for path in paths}
    from personalize.models.single_file import ldm_unet_key_map

    base_keys = [k.replace(".base_layer.", ".") for k in unet.state_dict() if ".lora_" not in k]
    try:
        ldm = ldm_unet_key_map(base_keys)
    except ValueError as err:
        raise ConfigError(f"lora.export_kohya: {err}") from None
    missing = [path for path in paths if f"{path}.weight" not in ldm]
    if missing:
        raise ConfigError(f"lora.export_kohya: the SDXL U-Net module {missing[0]} has no original-SD name; "
                          "adapt other lora.target_modules or set lora.export_kohya=false")
    return {path: ldm[f"{path}.weight"][: -len(".weight")] for path in paths}


def kohya_text_encoder_path(path: str) -> str:
    """``text_model.`` + path where transformers 5 flattened ``CLIPTextModel``."""
    return f"text_model.{path}" if path.startswith(_CLIP_TEXT_MODEL_PARTS) else path


def kohya_state_dict(models, with_text_encoders: bool) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of the adapted ``models`` (see the comment above)."""
    unet_layers = lora_layers(models.unet)
    parts = [("lora_unet_", unet_layers, kohya_unet_paths(models.unet, list(unet_layers), models.family.name))]
    if with_text_encoders:
        prefixes = ["lora_te_"] if len(models.text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
        for prefix, encoder in zip(prefixes, models.text_encoders):
            layers = lora_layers(encoder)
            parts.append((prefix, layers, {path: kohya_text_encoder_path(path) for path in layers}))
    out = {}
    for prefix, layers, kohya_paths in parts:
        for path, (down, up, alpha) in layers.items():
            name = prefix + kohya_paths[path].replace(".", "_")
            out[f"{name}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def save_kohya(models, with_text_encoders: bool, out_file: Path) -> Path:
    """Write :func:`kohya_state_dict` with the ``ss_`` metadata kohya's tools write."""
    from safetensors.torch import save_file

    unet_config = models.unet.peft_config["default"]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(unet_config.r),
                "ss_network_alpha": str(float(unet_config.lora_alpha))}
    save_file(kohya_state_dict(models, with_text_encoders), str(out_file), metadata=metadata)
    return out_file


# -- loading either file back ----------------------------------------------------------------------
_DOWN_WEIGHT = re.compile(r"(lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$")
_CROSS_ATTENTION_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def load_lora(pipe, file: Path, tensors: dict[str, torch.Tensor], option: str = "--lora",
              base: str = "the base model") -> None:
    """Load the LoRA ``file`` (diffusers or kohya keys; ``tensors`` its content, already read) into ``pipe``
    with diffusers' own loader. A safetensors file is loaded by name with ``use_safetensors`` (its adapter
    metadata, alpha included, is read; diffusers never falls back to a pickle). Refused with a message
    naming ``option``: a file made for another model family, one diffusers cannot load, and one whose
    layers do not all find their module in ``pipe``."""
    _refuse_other_family(pipe, tensors, file, option, base)
    before = _lora_layer_count(pipe)
    try:
        if file.suffix == ".safetensors":
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, use_safetensors=True)
        else:  # a pickle the user allowed, already read
            pipe.load_lora_weights(dict(tensors))
    except UserError:
        raise
    except Exception as err:  # diffusers and peft raise many types here; all mean the same to the user
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{option}: {file} does not load into {base}: {reason}") from None
    loaded, expected = _lora_layer_count(pipe) - before, sum(1 for k in tensors if _DOWN_WEIGHT.search(k))
    if loaded != expected:
        raise ModelLoadError(f"{option}: only {loaded} of the {expected} LoRA layers of {file} found their module "
                             f"in {base}; the file was made for another model")


def _refuse_other_family(pipe, tensors: dict[str, torch.Tensor], file: Path, option: str, base: str) -> None:
    if getattr(pipe, "text_encoder_2", None) is None and any(
            k.startswith(("lora_te2_", "text_encoder_2.")) for k in tensors):
        raise ModelLoadError(f"{option}: {file} is an SDXL LoRA (it adapts a second text encoder), but {base} is an "
                             "SD 1.x / 2.x model with one; load it on an SDXL base")
    width = next((v.shape[1] for k, v in tensors.items()
                  if "attn2" in k and "to_k" in k and _DOWN_WEIGHT.search(k) and v.ndim == 2), None)
    expected = pipe.unet.config.cross_attention_dim
    if width is not None and isinstance(expected, int) and width != expected:
        made = f" ({_CROSS_ATTENTION_WIDTHS[width]})" if width in _CROSS_ATTENTION_WIDTHS else ""
        theirs = f" ({_CROSS_ATTENTION_WIDTHS[expected]})" if expected in _CROSS_ATTENTION_WIDTHS else ""
        raise ModelLoadError(f"{option}: {file} was trained on a U-Net whose cross-attention reads {width}-wide text "
                             f"features{made}, but {base} reads {expected}-wide ones{theirs}; a LoRA loads only on "
                             "the model family it was trained on")


def _lora_layer_count(pipe) -> int:
    from peft.tuners.lora import LoraLayer

    modules = [getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")]
    return sum(len(layer.lora_A) for module in modules if module is not None
               for layer in module.modules() if isinstance(layer, LoraLayer))
