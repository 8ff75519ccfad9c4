"""LoRA (Hu et al. 2021) through peft on the U-Net's attention (and optionally the text encoders),
with optional prior preservation (DreamBooth-LoRA). Exports diffusers' ``pytorch_lora_weights.safetensors``
(loads with ``pipe.load_lora_weights``) and, on request, the kohya / A1111 key format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from personalize.config import ConfigError, option
from personalize.methods import register_method
from personalize.methods.base import Method

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoRAConfig:
    rank: int = option(4, "LoRA rank r")
    alpha: Optional[float] = option(None, "LoRA alpha (scale = alpha / rank); default: equal to rank")
    dropout: float = option(0.0, "dropout on the LoRA path")
    target_modules: list[str] = option(UNET_ATTENTION, "U-Net module names to adapt (peft target_modules)")
    train_text_encoder: bool = option(False, "also add LoRA to the text encoder(s)")
    text_encoder_rank: Optional[int] = option(None, "text encoder LoRA rank (default: rank)")
    text_encoder_target_modules: list[str] = option(TEXT_ATTENTION, "text encoder module names to adapt")
    text_encoder_learning_rate: Optional[float] = option(None, "text encoder LR (default: train.learning_rate)")
    export_kohya: bool = option(False, "also write pytorch_lora_weights_kohya.safetensors (A1111 / ComfyUI)")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank: must be > 0, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.text_encoder_rank is not None and self.text_encoder_rank <= 0:
            raise ConfigError(f"lora.text_encoder_rank: must be > 0, got {self.text_encoder_rank}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one module")


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig
    supports_prior_preservation = True

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
        from diffusers.utils import convert_state_dict_to_diffusers

        kwargs = {
            "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet)),
            "unet_lora_adapter_metadata": models.unet.peft_config["default"].to_dict(),
        }
        if self.trains_text_encoder:
            names = ["text_encoder", "text_encoder_2"]
            for name, encoder in zip(names, models.text_encoders):
                kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
                kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        models.family.pipeline_class.save_lora_weights(out_dir, **kwargs)
        written = [out_dir / "pytorch_lora_weights.safetensors"]
        if self.options.export_kohya:
            alphas = {"lora_unet_": models.unet.peft_config["default"].lora_alpha}
            for prefix, encoder in zip(["lora_te1_", "lora_te2_"], models.text_encoders if self.trains_text_encoder else []):
                alphas[prefix] = encoder.peft_config["default"].lora_alpha
            written.append(export_kohya(written[0], out_dir / "pytorch_lora_weights_kohya.safetensors", alphas))
        return written


def export_kohya(diffusers_file: Path, out_file: Path, alphas: dict[str, float]) -> Path:
    """Convert a diffusers LoRA file to kohya's ``lora_unet_...`` / ``lora_te1_...`` keys.

    ``alphas`` maps a key prefix to the LoRA alpha its layers were trained with; kohya stores it per
    layer (``....alpha``), and loaders scale by alpha / rank, so it must be the real one."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    peft_state = convert_all_state_dict_to_peft(load_file(str(diffusers_file)))
    kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_state).items()}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        prefix = next((p for p in alphas if key.startswith(p)), None)
        if prefix is None and key.startswith("lora_te_"):  # single text encoder models use lora_te_
            prefix = "lora_te1_"
        if prefix in alphas:
            kohya[key] = torch.tensor(float(alphas[prefix]))
    save_file(kohya, str(out_file), metadata={"ss_network_module": "networks.lora"})
    return out_file
