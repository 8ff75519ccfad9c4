"""Base-model loading (tiny / local folder / single file / hub id) and the single-file export.

Everything runs on the built-in tiny models or on meta-device models of real SD shapes; nothing is
downloaded and no real Hugging Face cache is touched.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from personalize.config import ModelConfig
from personalize.models import ModelLoadError, load_models
from personalize.models.family import FAMILIES
from personalize.models.single_file import ldm_state_dict, ldm_unet_key_map, save_single_file


def _modules(models) -> dict[str, torch.nn.Module]:
    out = {"unet": models.unet, "vae": models.vae}
    out.update({f"text_encoder_{i}": e for i, e in enumerate(models.text_encoders)})
    return out


def assert_same_weights(expected, actual) -> None:
    """U-Net, VAE and every text encoder of two Models bundles have equal state dicts."""
    exp, act = _modules(expected), _modules(actual)
    assert exp.keys() == act.keys()
    for name in exp:
        a, b = exp[name].state_dict(), act[name].state_dict()
        assert a.keys() == b.keys(), f"{name}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        unequal = [k for k in a if not torch.equal(a[k], b[k].to(a[k].device))]
        assert not unequal, f"{name}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"


def _perturb(models) -> None:
    """Change every weight, so a reload can only match if it really read the new file."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in _modules(models).values():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen))


# --- single-file export and reload ---------------------------------------------------------------

@pytest.mark.parametrize("name,family,prediction", [
    ("tiny-sd", "sd", "epsilon"), ("tiny-sdxl", "sdxl", "epsilon"), ("tiny-sd2-v", "sd", "v_prediction")])
def test_single_file_round_trip(tmp_path, name, family, prediction):
    models = load_models(ModelConfig(base=name))
    config_dir = tmp_path / "diffusers"
    models.pipeline().save_pretrained(config_dir)
    assert (config_dir / "model_index.json").is_file() and (config_dir / "unet" / "config.json").is_file()
    _perturb(models)  # the folder now holds other weights: equality below proves the file was read

    path = save_single_file(models, tmp_path / "x.safetensors")
    assert path == tmp_path / "x.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if family == "sdxl":
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
    elif name == "tiny-sd2-v":  # SD 2.x: OpenCLIP layout
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert ("v_pred" in keys) == (prediction == "v_prediction")

    loaded = load_models(ModelConfig(base=str(path), single_file_config=str(config_dir)))
    assert loaded.family.name == family
    assert loaded.noise_scheduler.config.prediction_type == prediction
    assert_same_weights(models, loaded)


def test_single_file_pickle_needs_allow_pickle_and_then_loads(tmp_path):
    models = load_models(ModelConfig(base="tiny-sdxl"))
    config_dir = tmp_path / "diffusers"
    models.pipeline().save_pretrained(config_dir)
    _perturb(models)
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in ldm_state_dict(models).items()}}, ckpt)

    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_models(ModelConfig(base=str(ckpt), single_file_config=str(config_dir)))
    loaded = load_models(ModelConfig(base=str(ckpt), single_file_config=str(config_dir), allow_pickle=True))
    assert loaded.family.name == "sdxl"
    assert_same_weights(models, loaded)


def test_save_single_file_dtype(tmp_path):
    models = load_models(ModelConfig(base="tiny-sd"))
    state = load_file(str(save_single_file(models, tmp_path / "half.safetensors", dtype=torch.float16)))
    assert {v.dtype for v in state.values()} == {torch.float16}
    vae_q = models.vae.state_dict()["encoder.mid_block.attentions.0.to_q.weight"]
    ldm_q = state["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert ldm_q.shape == (*vae_q.shape, 1, 1)  # LDM's VAE attention is 1x1 convolutions
    assert torch.equal(ldm_q[:, :, 0, 0], vae_q.half())
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(models, tmp_path / "model.ckpt")


def test_unet_key_map_tiny_layout():
    models = load_models(ModelConfig(base="tiny-sd"))  # 2 blocks, 1 layer each; attention in block 1
    mapping = ldm_unet_key_map(models.unet.state_dict().keys())
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    expected = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.2.0.op.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.3.0.skip_connection.weight",
        "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.3.1.proj_in.weight",
        "mid_block.resnets.0.time_emb_proj.weight": "middle_block.0.emb_layers.1.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.1.conv2.bias": "middle_block.2.out_layers.3.bias",
        "up_blocks.0.resnets.1.conv1.weight": "output_blocks.1.0.in_layers.2.weight",
        "up_blocks.0.attentions.1.proj_out.weight": "output_blocks.1.1.proj_out.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.1.2.conv.weight",
        "up_blocks.1.resnets.0.norm2.weight": "output_blocks.2.0.out_layers.0.weight",
        "conv_out.weight": "out.2.weight",
    }
    assert {k: mapping[k] for k in expected} == expected
    with pytest.raises(ValueError, match="lora"):
        ldm_unet_key_map(["down_blocks.1.attentions.0.proj_in.lora_A.default.weight", "conv_in.lora_B.weight"])


# --- real SD shapes (meta device: no memory, no download) ----------------------------------------

def _meta_models(kind: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(width, layers, cls=CLIPTextModel):
        return cls(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
                                  num_hidden_layers=layers, projection_dim=width))

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        if kind == "sdxl":
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
            encoders = [clip(768, 12), clip(1280, 32, CLIPTextModelWithProjection)]
        else:
            sd2 = kind == "sd2"
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=1024 if sd2 else 768, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
                use_linear_projection=sd2)
            encoders = [clip(1024, 23) if sd2 else clip(768, 12)]
    family = FAMILIES["sdxl" if kind == "sdxl" else "sd"]
    return SimpleNamespace(family=family, unet=unet, vae=vae, text_encoders=encoders, noise_scheduler=DDPMScheduler())


@pytest.mark.parametrize("kind,model_type,known", [
    ("sd1", "v1", {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }),
    ("sd2", "v2", {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
    }),
    ("sdxl", "xl_base", {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    }),
])
def test_real_shapes_match_diffusers_converters(kind, model_type, known):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint, infer_diffusers_model_type)

    models = _meta_models(kind)
    ckpt = ldm_state_dict(models)
    assert {k: tuple(ckpt[k].shape) for k in known} == known
    assert infer_diffusers_model_type(ckpt) == model_type
    if kind == "sdxl":  # the counts of the original sd_xl_base_1.0 checkpoint
        assert sum(k.startswith("model.diffusion_model.") for k in ckpt) == 1680
        assert sum(k.startswith("first_stage_model.") for k in ckpt) == 248

    def same_shapes(converted, module, strip=""):
        converted = {k.removeprefix(strip): v for k, v in converted.items()}
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)

    same_shapes(convert_ldm_unet_checkpoint(ckpt, models.unet.config), models.unet)
    same_shapes(convert_ldm_vae_checkpoint(ckpt, models.vae.config), models.vae)
    first = models.text_encoders[0]
    if kind == "sd2":
        same_shapes(convert_open_clip_checkpoint(first, ckpt), first, strip="text_model.")
    else:
        same_shapes(convert_ldm_clip_checkpoint(ckpt), first, strip="text_model.")
    if kind == "sdxl":
        second = models.text_encoders[1]
        same_shapes(convert_open_clip_checkpoint(second, ckpt, prefix="conditioner.embedders.1.model."), second)


# --- local folders and pickles -------------------------------------------------------------------

def test_local_diffusers_folder_loads(tmp_path):
    models = load_models(ModelConfig(base="tiny-sdxl"))
    models.pipeline().save_pretrained(tmp_path / "model")
    loaded = load_models(ModelConfig(base=str(tmp_path / "model")))
    assert loaded.family.name == "sdxl"
    assert_same_weights(models, loaded)


def test_folder_without_model_index_is_refused(tmp_path):
    folder = tmp_path / "not-a-model"
    (folder / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        load_models(ModelConfig(base=str(folder)))
    assert str(folder) in str(err.value)


def test_pickle_only_folder_needs_allow_pickle(tmp_path):
    models = load_models(ModelConfig(base="tiny-sd"))
    folder = tmp_path / "model"
    models.pipeline().save_pretrained(folder, safe_serialization=False)
    # transformers 5 writes .safetensors whatever it is told; make the folder pickle-only by hand
    te = folder / "text_encoder"
    for st in te.glob("*.safetensors"):
        torch.save(load_file(str(st)), te / "pytorch_model.bin")
        st.unlink()
    assert not list(folder.glob("*/*.safetensors")) and len(list(folder.glob("*/*.bin"))) == 3

    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_models(ModelConfig(base=str(folder)))
    loaded = load_models(ModelConfig(base=str(folder), allow_pickle=True))
    assert_same_weights(models, loaded)


def test_ckpt_file_is_refused_without_allow_pickle(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, ckpt)
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_models(ModelConfig(base=str(ckpt)))


# --- hub ids, missing paths, family and prediction type ------------------------------------------

def _load_error(base: str) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_models(ModelConfig(base=base))
    return str(err.value), time.monotonic() - start


def _assert_offline_message(message: str) -> None:
    assert "someorg/some-model" in message
    assert "not on this machine" in message
    assert "model.base=" in message


def test_hub_id_offline_fails_fast_with_instructions(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message, elapsed = _load_error("someorg/some-model")
    _assert_offline_message(message)
    assert elapsed < 5


def test_hub_id_unreachable_hub_fails_fast_with_instructions(empty_hub_cache, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # an endpoint that never resolves (RFC 2606), so the test is the same on machines with network
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(hf_api.api, "endpoint", "https://hub.invalid")
    message, elapsed = _load_error("someorg/some-model")
    _assert_offline_message(message)
    assert elapsed < 30


def test_missing_path_does_not_exist():
    message, _ = _load_error("./nope/model.safetensors")
    assert "does not exist" in message and "nope/model.safetensors" in message


def test_family_mismatch_is_refused():
    with pytest.raises(ModelLoadError, match="sdxl"):
        load_models(ModelConfig(base="tiny-sd", family="sdxl"))
    assert load_models(ModelConfig(base="tiny-sdxl", family="sdxl")).family.name == "sdxl"


def test_prediction_type_override_and_default():
    assert load_models(ModelConfig(base="tiny-sd")).noise_scheduler.config.prediction_type == "epsilon"
    overridden = load_models(ModelConfig(base="tiny-sd", prediction_type="v_prediction"))
    assert overridden.noise_scheduler.config.prediction_type == "v_prediction"
    assert load_models(ModelConfig(base="tiny-sd2-v")).noise_scheduler.config.prediction_type == "v_prediction"
