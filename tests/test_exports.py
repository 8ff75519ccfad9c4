"""Exports load in stock diffusers and reproduce the trained model; SDXL and SD 2.x (v-prediction) train.

The kohya LoRA file is checked part by part: loaded with diffusers' own kohya converter on a fresh
pipeline, every layer of the file lands on its module with its weights and alpha, and the adapted
U-Net and text encoders compute exactly what the diffusers-format file gives."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from conftest import make_config, run_training
from personalize.cli import main
from personalize.config import ModelConfig
from personalize.methods import get_method_class
from personalize.methods.lora import DIFFUSERS_FILE, KOHYA_FILE, lora_layers
from personalize.models import load_models

FAST = ["train.checkpoint_every=0", "validation.prompts=[]"]
SDXL_ADDED = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}


def unet_output(unet, cross_dim=32, added=None):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, cross_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def base_unet_output(unet, base):
    return unet_output(unet, 64, SDXL_ADDED) if base == "tiny-sdxl" else unet_output(unet)


def fresh_pipeline(base="tiny-sd"):
    return load_models(ModelConfig(base=base)).pipeline()


def lora_export(tmp_path: Path, base: str, *overrides: str, seed: int = 0):
    """The lora method's export of ``base`` with random, non-zero LoRA weights (no training: every layer
    does something, so a layer lost on loading shows). Returns (the adapted models, the export folder)."""
    config = make_config("tiny/lora", tmp_path, f"model.base={base}", "lora.export_kohya=true", *overrides)
    method = get_method_class("lora")(config)
    models = load_models(config.model)
    method.setup(models)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [models.unet, *models.text_encoders]:
            for name, param in module.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out = tmp_path / "export"
    out.mkdir(parents=True)
    method.export(models, out)
    return models, out


def adapter_layers(module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (lora_A, lora_B, scaling)} of every LoRA layer diffusers loaded into ``module``."""
    out = {}
    for path, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter in layer.lora_A:
                out[path] = (layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                             layer.scaling[adapter])
    return out


def text_outputs(pipe_or_models, ids):
    encoders = getattr(pipe_or_models, "text_encoders", None) or [
        e for e in (pipe_or_models.text_encoder, getattr(pipe_or_models, "text_encoder_2", None)) if e is not None]
    with torch.no_grad():
        return [encoder(ids)[0] for encoder in encoders]


KOHYA_CASES = {
    "sd-unet-only": ("tiny-sd", []),
    "sd-text-encoder-alpha-not-rank": ("tiny-sd", ["lora.train_text_encoder=true", "lora.rank=4", "lora.alpha=8",
                                                   "lora.text_encoder_rank=2"]),
    "sdxl-unet-only-alpha-not-rank": ("tiny-sdxl", ["lora.rank=4", "lora.alpha=2"]),
    "sdxl-two-text-encoders": ("tiny-sdxl", ["lora.train_text_encoder=true", "lora.alpha=6"]),
    "sd-beyond-attention": ("tiny-sd", ["lora.target_modules=[to_q,to_v,proj_in,conv1,conv2,time_emb_proj,"
                                        "conv_shortcut,ff.net.0.proj,conv_in,time_embedding.linear_1,"
                                        "downsamplers.0.conv,upsamplers.0.conv]",
                                        "lora.train_text_encoder=true",
                                        "lora.text_encoder_target_modules=[q_proj,out_proj,fc1,fc2]"]),
    "sdxl-beyond-attention": ("tiny-sdxl", ["lora.target_modules=[to_k,to_out.0,proj_out,conv1,conv2,time_emb_proj,"
                                            "conv_shortcut,ff.net.2,conv_out,add_embedding.linear_1,"
                                            "downsamplers.0.conv,upsamplers.0.conv]"]),
}


@pytest.mark.parametrize("case", list(KOHYA_CASES))
def test_kohya_file_loads_every_layer_like_the_diffusers_file(tmp_path, case):
    base, overrides = KOHYA_CASES[case]
    models, out = lora_export(tmp_path, base, *overrides)
    kohya = load_file(str(out / KOHYA_FILE))
    n_layers = sum(k.endswith(".lora_down.weight") for k in kohya)

    from_diffusers, from_kohya = fresh_pipeline(base), fresh_pipeline(base)
    from_diffusers.load_lora_weights(str(out), weight_name=DIFFUSERS_FILE)
    from_kohya.load_lora_weights(str(out), weight_name=KOHYA_FILE)  # diffusers' kohya converter

    parts = [("unet", models.unet)] + [(name, encoder) for name, encoder in
                                       zip(["text_encoder", "text_encoder_2"], models.text_encoders)
                                       if hasattr(encoder, "peft_config")]
    loaded = 0
    for name, trained in parts:
        want = lora_layers(trained)
        for pipe in (from_diffusers, from_kohya):
            got = adapter_layers(getattr(pipe, name))
            assert set(got) == set(want), f"{name}: layers {sorted(set(want) ^ set(got))[:4]} differ"
            for path, (down, up, alpha) in want.items():
                torch.testing.assert_close(got[path][0], down, rtol=0, atol=0)
                torch.testing.assert_close(got[path][1], up, rtol=0, atol=0)
                assert got[path][2] == pytest.approx(alpha / down.shape[0]), f"{name}.{path}: scale is not alpha / rank"
        loaded += len(want)
    assert loaded == n_layers  # every layer of the kohya file was consumed
    for name in ("text_encoder", "text_encoder_2"):  # parts the file does not adapt stay untouched
        if getattr(from_kohya, name, None) is not None and name not in dict(parts):
            assert not adapter_layers(getattr(from_kohya, name))

    expected = base_unet_output(models.unet, base)
    assert not torch.allclose(expected, base_unet_output(fresh_pipeline(base).unet, base), atol=1e-3)
    torch.testing.assert_close(base_unet_output(from_kohya.unet, base), base_unet_output(from_diffusers.unet, base),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_unet_output(from_kohya.unet, base), expected, atol=1e-5, rtol=1e-4)
    ids = from_kohya.tokenizer(["a photo of sks toy"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    for a, b, c in zip(text_outputs(from_kohya, ids), text_outputs(from_diffusers, ids), text_outputs(models, ids)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


# the key names A1111, ComfyUI and kohya's sd-scripts look up (no model needed to check them)
_PARTS = r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
SD_UNET = re.compile(r"^lora_unet_(down_blocks_\d+_attentions_\d+|mid_block_attentions_0|up_blocks_\d+_attentions_\d+)"
                     r"_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)" + _PARTS)
SDXL_UNET = re.compile(r"^lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)"
                       r"_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)" + _PARTS)
TEXT = r"text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj" + _PARTS


@pytest.mark.parametrize("base,unet_names,text_prefixes", [
    ("tiny-sd", SD_UNET, ["lora_te_"]),
    ("tiny-sdxl", SDXL_UNET, ["lora_te1_", "lora_te2_"]),
])
def test_kohya_key_names_are_the_ones_consumers_look_up(tmp_path, base, unet_names, text_prefixes):
    _, out = lora_export(tmp_path, base, "lora.train_text_encoder=true", "lora.rank=4", "lora.alpha=8",
                         "lora.text_encoder_rank=2")
    kohya = load_file(str(out / KOHYA_FILE))
    unet = [k for k in kohya if k.startswith("lora_unet_")]
    assert unet and all(unet_names.match(k) for k in unet), [k for k in unet if not unet_names.match(k)][:3]
    for prefix in text_prefixes:
        text = [k for k in kohya if k.startswith(prefix)]
        assert text and all(re.match(re.escape(prefix) + TEXT, k) for k in text), text[:3]
    assert len(unet) + sum(k.startswith(tuple(text_prefixes)) for k in kohya) == len(kohya)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    for module in modules:  # each module: down, up and its real alpha (loaders scale by alpha / rank)
        down, up, alpha = (kohya[f"{module}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        rank = 4 if module.startswith("lora_unet_") else 2
        assert down.shape[0] == rank and up.shape[1] == rank and alpha.ndim == 0 and float(alpha) == 8.0


def test_lora_trains_and_both_files_load(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=4", "train.learning_rate=1e-2",
                           "lora.rank=4", "lora.alpha=8", "lora.export_kohya=true", "lora.train_text_encoder=true")
    out = tmp_path / "run"
    trained = unet_output(trainer.inference_models().unet)
    assert not torch.allclose(trained, unet_output(fresh_pipeline().unet), atol=1e-4)  # the LoRA does something
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = fresh_pipeline()
        pipe.load_lora_weights(str(out), weight_name=name)
        torch.testing.assert_close(unet_output(pipe.unet), trained, atol=1e-5, rtol=1e-4)  # alpha != rank honoured
    assert pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_lora_with_text_encoder_loads(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=3", "train.learning_rate=1e-2",
                           "lora.train_text_encoder=true")
    models = trainer.inference_models()
    ids = models.tokenize(["a photo of sks toy"])[0]
    with torch.no_grad():
        trained_text = models.text_encoder(ids)[0]
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(tmp_path / "run"))
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], trained_text, atol=1e-5, rtol=1e-4)


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
    return image


def test_toy_model_loads_with_the_documented_call():
    """The model card's own command, as written: no torch_dtype (transformers 5 loads a text encoder in its
    config's dtype, diffusers the U-Net in fp32; the config must say float32)."""
    card = Path("docs/toy-model.md").read_text()
    assert 'StableDiffusionPipeline.from_pretrained("personalize/toyworld/assets/toy-model")' in card
    pipe = StableDiffusionPipeline.from_pretrained("personalize/toyworld/assets/toy-model")
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    assert sample(pipe).std() > 0.02


def test_dreambooth_output_is_a_diffusers_pipeline(tmp_path):
    trainer = run_training("tiny/dreambooth", tmp_path, *FAST, "train.max_steps=2", "train.mixed_precision=bf16",
                           f"prior.class_images={tmp_path / 'class'}", "prior.num_class_images=2",
                           "dreambooth.export_single_file=true")
    out = tmp_path / "run"
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # the README's call, as written
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    trained = trainer.inference_models().unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    sample(pipe)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert not (out / ".export-tmp").exists()


def test_text2image_output_is_a_diffusers_pipeline(tmp_path):
    run_training("tiny/text2image", tmp_path, *FAST, "train.max_steps=2", "train.mixed_precision=bf16")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run"))
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    sample(pipe)


def test_autoencoder_export_loads_with_the_plain_call(tmp_path):
    from personalize.recipes import load_config
    from personalize.training.trainer import Trainer

    recipe = {"method": "autoencoder", "model": {"base": "tiny-sd"},
              "data": {"instance_images": "recipes/tiny/subject", "instance_prompt": "a photo of sks toy",
                       "resolution": 64},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "checkpoint_every": 0,
                        "mixed_precision": "bf16", "progress_bar": False, "report_to": "none"},
              "validation": {"prompts": []}, "autoencoder": {"scaling_images": 4}}
    Trainer(load_config(recipe)).train()
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "run" / "vae"))
    assert vae.dtype == torch.float32
    with torch.no_grad():
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    assert decoded.shape == pixels.shape and torch.isfinite(decoded).all()


def test_textual_inversion_loads(tmp_path):
    trainer = run_training("tiny/textual-inversion", tmp_path, *FAST, "train.max_steps=3")
    learned = trainer.method.learned_embeds()
    file = tmp_path / "run" / "learned_embeds.safetensors"
    assert load_file(str(file))["<sks-toy>"].shape == (2, 32)
    pipe = fresh_pipeline()
    pipe.load_textual_inversion(str(file), token="<sks-toy>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks-toy>", "<sks-toy>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), learned)
    assert pipe("a photo of <sks-toy>", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_sdxl_lora_trains_and_loads(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "model.base=tiny-sdxl", "train.max_steps=3",
                           "train.learning_rate=1e-2", "lora.train_text_encoder=true", "lora.export_kohya=true")
    assert trainer.models.family.name == "sdxl"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    trained = unet_output(trainer.inference_models().unet, cross_dim=64, added=SDXL_ADDED)
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = fresh_pipeline("tiny-sdxl")
        pipe.load_lora_weights(str(tmp_path / "run"), weight_name=name)
        torch.testing.assert_close(unet_output(pipe.unet, cross_dim=64, added=SDXL_ADDED), trained,
                                   atol=1e-5, rtol=1e-4)
    assert pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_sd2_v_prediction_lora_trains(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "model.base=tiny-sd2-v", "train.max_steps=3",
                           "train.snr_gamma=5.0")
    assert trainer.models.noise_scheduler.config.prediction_type == "v_prediction"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    pipe = fresh_pipeline("tiny-sd2-v")
    pipe.load_lora_weights(str(tmp_path / "run"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("weights", [DIFFUSERS_FILE, KOHYA_FILE])
def test_cli_generate_with_lora(tmp_path, weights):
    _, lora = lora_export(tmp_path / "lora", "tiny-sd", "lora.train_text_encoder=true", "lora.alpha=8")
    out = tmp_path / "gen"
    assert main(["generate", "--base", "tiny-sd", "--lora", str(lora / weights), "--prompt", "a photo of sks toy",
                 "-n", "2", "--steps", "2", "--resolution", "64", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000.png", "001.png", "generate.json", "grid.png"]
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["files"] == ["000.png", "001.png", "grid.png"] and manifest["lora"] == str(lora / weights)
    assert manifest["prompt"] == "a photo of sks toy" and manifest["n"] == 2 and manifest["steps"] == 2
