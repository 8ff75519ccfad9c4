"""Exports load in stock diffusers and reproduce the trained model; SDXL and SD 2.x (v-prediction) train."""

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import run_training
from personalize.cli import main
from personalize.config import ModelConfig
from personalize.models import load_models

FAST = ["train.checkpoint_every=0", "validation.prompts=[]"]


def unet_output(unet, cross_dim=32, added=None):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, cross_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def fresh_pipeline(base="tiny-sd"):
    return load_models(ModelConfig(base=base)).pipeline()


def test_lora_loads_in_diffusers_and_kohya_format(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=4", "train.learning_rate=1e-2",
                           "lora.rank=4", "lora.alpha=8", "lora.export_kohya=true")
    out = tmp_path / "run"
    trained = unet_output(trainer.inference_models().unet)
    base = unet_output(fresh_pipeline().unet)
    assert not torch.allclose(trained, base, atol=1e-4)  # the LoRA does something

    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(unet_output(pipe.unet), trained, atol=1e-5, rtol=1e-4)  # alpha != rank honoured
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)

    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(out / "pytorch_lora_weights_kohya.safetensors"))
    torch.testing.assert_close(unet_output(pipe.unet), trained, atol=1e-5, rtol=1e-4)


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


def test_dreambooth_output_is_a_diffusers_pipeline(tmp_path):
    trainer = run_training("tiny/dreambooth", tmp_path, *FAST, "train.max_steps=2",
                           f"prior.class_images={tmp_path / 'class'}", "prior.num_class_images=2")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run"), safety_checker=None)
    trained = trainer.inference_models().unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert not (tmp_path / "run" / ".export-tmp").exists()


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
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    trained = unet_output(trainer.inference_models().unet, cross_dim=64, added=added)
    pipe = fresh_pipeline("tiny-sdxl")
    pipe.load_lora_weights(str(tmp_path / "run"))
    torch.testing.assert_close(unet_output(pipe.unet, cross_dim=64, added=added), trained, atol=1e-5, rtol=1e-4)
    assert pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
    kohya = load_file(str(tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors"))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)


def test_sd2_v_prediction_lora_trains(tmp_path):
    trainer = run_training("tiny/lora", tmp_path, *FAST, "model.base=tiny-sd2-v", "train.max_steps=3",
                           "train.snr_gamma=5.0")
    assert trainer.models.noise_scheduler.config.prediction_type == "v_prediction"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    pipe = fresh_pipeline("tiny-sd2-v")
    pipe.load_lora_weights(str(tmp_path / "run"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_cli_generate_with_lora(tmp_path):
    run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=2")
    out = tmp_path / "gen"
    assert main(["generate", "--base", "tiny-sd", "--lora", str(tmp_path / "run"), "--prompt", "a photo of sks toy",
                 "-n", "2", "--steps", "2", "--resolution", "64", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png"]
