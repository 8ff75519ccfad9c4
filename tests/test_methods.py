"""After a few optimizer steps exactly the parameters a method trains have changed."""

import pytest
import torch

from conftest import make_config
from personalize.methods.base import unwrap
from personalize.training.trainer import Trainer

STEPS = ["train.max_steps=3", "train.checkpoint_every=0", "validation.prompts=[]"]


def snapshot(models) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in [("unet", models.unet), ("vae", models.vae),
                           *[(f"text_encoder{i}", e) for i, e in enumerate(models.text_encoders)]]:
        for name, p in unwrap(module).named_parameters():
            out[f"{prefix}.{name}"] = p.detach().clone()
    return out


def train_and_diff(recipe, tmp_path, *overrides):
    trainer = Trainer(make_config(recipe, tmp_path, *STEPS, *overrides))
    trainer.setup()
    before = snapshot(trainer.models)
    trainer.train()
    after = snapshot(trainer.models)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return trainer, before, after, changed


def test_lora_changes_only_adapter_weights(tmp_path):
    trainer, before, _, changed = train_and_diff("tiny/lora", tmp_path)
    lora = {k for k in before if ".lora_" in k}
    assert lora and all(k.startswith("unet.") for k in lora)
    assert changed == lora  # every adapter weight moved, no base weight did
    n_trainable = sum(p.numel() for p in trainer.params)
    assert n_trainable == sum(before[k].numel() for k in lora)


def test_lora_with_text_encoder(tmp_path):
    _, before, _, changed = train_and_diff("tiny/lora", tmp_path, "lora.train_text_encoder=true")
    lora = {k for k in before if ".lora_" in k}
    assert any(k.startswith("text_encoder0.") for k in lora)
    assert changed == lora


def test_dreambooth_changes_unet_only(tmp_path):
    _, before, _, changed = train_and_diff("tiny/dreambooth", tmp_path,
                                           f"prior.class_images={tmp_path / 'class'}", "prior.num_class_images=2")
    unet = {k for k in before if k.startswith("unet.")}
    assert changed == unet


def test_dreambooth_with_text_encoder(tmp_path):
    _, before, _, changed = train_and_diff("tiny/dreambooth", tmp_path, "prior.enabled=false",
                                           "dreambooth.train_text_encoder=true")
    expected = {k for k in before if k.startswith(("unet.", "text_encoder0."))}
    assert changed == expected
    assert not any(k.startswith("vae.") for k in changed)


def test_dreambooth_identifier_token_trains_its_embedding_row_beside_the_unet(tmp_path):
    """Pivotal tuning: the U-Net and the identifier's embedding row train; every other embedding row and
    every text-encoder layer stays bitwise as it was, so prompts without the identifier encode as before."""
    trainer, before, after, changed = train_and_diff("tiny/dreambooth", tmp_path, "prior.enabled=false",
                                                     "dreambooth.identifier_token=sks",
                                                     "dreambooth.identifier_learning_rate=1e-2")
    key = "text_encoder0.embeddings.token_embedding.weight"
    assert changed == {k for k in before if k.startswith("unet.")} | {key}
    (sks,) = trainer.models.tokenizer.encode("sks", add_special_tokens=False)
    others = torch.ones(before[key].shape[0], dtype=torch.bool)
    others[sks] = False
    assert torch.equal(before[key][others], after[key][others])
    assert not torch.equal(before[key][sks], after[key][sks])
    lrs = sorted(group["lr"] for group in trainer.optimizer.param_groups)
    assert lrs == [1e-4, 1e-2]  # the recipe's U-Net LR and the identifier's own

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run")  # stock diffusers carries the learned row
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach(), after[key])


@pytest.mark.parametrize("overrides, key", [
    (["dreambooth.identifier_token=zorbo"], "data.instance_prompt"),
    (["dreambooth.identifier_token=sks", "dreambooth.train_text_encoder=true"], "dreambooth.identifier_token"),
    (["dreambooth.identifier_token=sks", "prior.class_prompt=a photo of sks toy"], "prior.class_prompt"),
    (["dreambooth.identifier_learning_rate=1e-3"], "dreambooth.identifier_learning_rate"),
])
def test_dreambooth_identifier_token_bad_settings_name_the_key(tmp_path, overrides, key):
    from personalize.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config("tiny/dreambooth", tmp_path, *overrides)


def test_dreambooth_identifier_token_of_several_tokens_is_refused(tmp_path):
    from personalize.config import ConfigError

    trainer = Trainer(make_config("tiny/dreambooth", tmp_path, *STEPS, "prior.enabled=false",
                                  "data.instance_prompt=a photo of zqxjkvw toy",
                                  "dreambooth.identifier_token=zqxjkvw"))
    with pytest.raises(ConfigError, match="dreambooth.identifier_token: 'zqxjkvw' is [2-9] tokens"):
        trainer.setup()


def test_textual_inversion_changes_only_new_rows(tmp_path):
    trainer, before, after, changed = train_and_diff("tiny/textual-inversion", tmp_path)
    key = "text_encoder0.embeddings.token_embedding.weight"
    assert changed == {key}
    ids = trainer.method.token_ids
    assert len(ids) == 2  # num_vectors: 2
    old, new = before[key], after[key]
    others = torch.ones(old.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(old[others], new[others])  # every other row bitwise unchanged
    assert all(not torch.equal(old[i], new[i]) for i in ids)


def test_text2image_trains_unet_and_text_encoder(tmp_path):
    _, before, _, changed = train_and_diff("tiny/text2image", tmp_path)
    assert changed == {k for k in before if k.startswith(("unet.", "text_encoder0."))}


def test_bf16_keeps_trainable_weights_fp32(tmp_path):
    trainer, before, after, changed = train_and_diff("tiny/textual-inversion", tmp_path, "train.mixed_precision=bf16")
    models = trainer.models
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert models.vae.dtype == torch.bfloat16
    assert unwrap(models.unet).dtype == torch.bfloat16
    assert unwrap(models.text_encoder).dtype == torch.float32  # kept whole: its embedding trains
    key = "text_encoder0.embeddings.token_embedding.weight"
    assert changed == {key}


def test_lora_bf16_8bit_adam_checkpointing_snr_offset_ema(tmp_path):
    trainer, before, _, changed = train_and_diff(
        "tiny/lora", tmp_path, "train.mixed_precision=bf16", "train.optimizer=adamw8bit",
        "train.gradient_checkpointing=true", "train.snr_gamma=5.0", "train.noise_offset=0.05", "train.ema=true",
        "train.gradient_accumulation_steps=2", "train.lr_scheduler=cosine", "train.lr_warmup_steps=1",
        "lora.alpha=8", "lora.dropout=0.1")
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert changed == {k for k in before if ".lora_" in k}
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)


def test_nan_loss_stops_without_export(tmp_path, monkeypatch):
    from personalize.methods.lora import LoRA
    from personalize.training.trainer import TrainingDiverged

    original = LoRA.loss

    def poisoned(self, batch):  # the method's loss(batch) contract (issue 23): the models come through bind
        terms = original(self, batch)
        return {"diffusion_loss": terms["diffusion_loss"] * float("nan")}

    monkeypatch.setattr(LoRA, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="not finite at step 1"):
        Trainer(make_config("tiny/lora", tmp_path, *STEPS)).train()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
