"""The toy world: renderer determinism and vocabulary, captions, subjects, rendered training sets,
the toy architecture, the autoencoder method and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from personalize.toyworld import (
    ACCESSORIES, CLASSES, COLORS, SCENES, ImageSpec, caption, heldout_subjects, render, sample_spec,
    training_subject,
)
from personalize.toyworld.world import MARKING_COLORS
from tests.conftest import make_config, run_training


def test_render_is_deterministic_and_seed_dependent():
    rng = np.random.default_rng(0)
    for _ in range(5):
        spec = sample_spec(rng, training_subject(7) if rng.random() < 0.5 else None)
        image = render(spec)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image, render(spec))
    snow = ImageSpec("star", "red", scene="snow", seed=1)
    assert not np.array_equal(render(snow), render(snow.replace(seed=2)))  # snowflakes move


@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_color_scene_and_accessory_renders(cls):
    for i, (color, scene) in enumerate(zip(COLORS, [*SCENES, None])):
        accessory = [*ACCESSORIES, None][i % (len(ACCESSORIES) + 1)]
        image = render(ImageSpec(cls, color, scene=scene, accessory=accessory, seed=i))
        assert image.std() > 10  # not a blank frame
    # the object's own color fills a good part of the frame on a plain background
    image = render(ImageSpec(cls, "blue"))
    blue = np.all(np.abs(image.astype(int) - COLORS["blue"]) < 20, axis=-1).mean()
    assert blue > 0.05


def test_bad_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        render(ImageSpec("dog", "red"))
    with pytest.raises(ValueError, match="unknown scene 'moon'"):
        render(ImageSpec("star", "red", scene="moon"))


def test_captions_use_dreambench_phrasing():
    assert caption(ImageSpec("star", "red", scene="beach")) == "a red star on the beach"
    assert caption(ImageSpec("star", "orange", accessory="santa hat")) == "an orange star wearing a santa hat"
    assert caption(ImageSpec("ball", "blue", pattern="striped", size="big", scene="snow")) == \
        "a big blue striped ball in the snow"
    subject = heldout_subjects()[0]
    spec = ImageSpec(subject.cls, subject.color, scene="night", subject=subject)
    assert caption(spec, token="sks") == f"a sks {subject.cls} at night"  # own color is not named
    other = "purple" if subject.color != "purple" else "green"
    assert caption(spec.replace(color=other), token="sks") == f"a {other} sks {subject.cls} at night"


def test_subjects_keep_their_markings_when_recolored_and_moved():
    subject = heldout_subjects()[3]
    base = ImageSpec(subject.cls, subject.color, size="big", radius=0.38, seed=0, subject=subject)
    for spec in [base, base.replace(color="purple" if subject.color != "purple" else "green"),
                 base.replace(scene="jungle", x=0.45)]:
        image = render(spec).astype(int)
        for marking in subject.markings:
            present = np.all(np.abs(image - MARKING_COLORS[marking.color]) < 12, axis=-1).sum()
            assert present >= 12, (marking, spec.color)  # bold: at least a dozen pixels at 64 px


def test_heldout_subjects_are_fixed_and_not_in_the_training_supply():
    held = heldout_subjects()
    assert len(held) >= 10 and held == heldout_subjects()
    signatures = {(s.cls, s.warp, s.markings) for s in held}
    assert len(signatures) == len(held)
    assert not signatures & {(t.cls, t.warp, t.markings) for t in map(training_subject, range(2000))}


def test_validation_subjects_are_neither_held_out_nor_training_subjects():
    from personalize.evaluation.subjects import DataError
    from personalize.evaluation.toybench import toy_subjects
    from personalize.toyworld.world import validation_subject

    val = [validation_subject(f"val-{i}") for i in range(20)]
    assert val == [validation_subject(f"val-{i}") for i in range(20)]
    signatures = {(s.cls, s.warp, s.markings) for s in val}
    assert len(signatures) == 20
    assert not signatures & {(s.cls, s.warp, s.markings) for s in heldout_subjects()}
    assert not signatures & {(t.cls, t.warp, t.markings) for t in map(training_subject, range(2000))}
    with pytest.raises(ValueError, match="val-0, val-1"):
        validation_subject("val-x")
    with pytest.raises(DataError, match="validation subjects: val-0"):
        toy_subjects(["val-x"], "unused")


def test_render_dataset_is_complete_or_absent(tmp_path):
    from personalize.toyworld.dataset import render_dataset

    metadata = render_dataset(tmp_path / "set" / "metadata.jsonl", 12, seed=3, progress=False)
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(records) == 12 and all((metadata.parent / r["file_name"]).is_file() for r in records)
    stamp = metadata.stat().st_mtime_ns
    render_dataset(metadata, 12, seed=3, progress=False)  # present: not rendered again
    assert metadata.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".render-*"))


def test_toy_tokenizer_round_trip_and_added_tokens():
    from personalize.models.toy import MAX_TOKENS, build_toy_init

    tokenizer = build_toy_init()[1]["tokenizer"]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == MAX_TOKENS
    ids = tokenizer("a red star wearing a santa hat on the beach").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red star wearing a santa hat on the beach"
    assert tokenizer.add_tokens(["<zorbo>"]) == 1
    ids = tokenizer("a <zorbo> star").input_ids
    assert 49408 in ids and len(ids) == 5  # bos, a, <zorbo>, star, eos


def test_autoencoder_trains_only_the_vae_and_exports_a_loadable_vae(tmp_path):
    from personalize.models import load_models

    trainer = run_training("toy/vae", tmp_path, "train.max_steps=2", "train.batch_size=2",
                           f"data.metadata={tmp_path / 'data' / 'metadata.jsonl'}", "data.toyworld_images=8",
                           "train.mixed_precision=no", "autoencoder.scaling_images=8")
    from personalize.models.toy import build_toy_init

    fresh = build_toy_init()[1]
    models = trainer.inference_models()
    changed = lambda a, b: any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert changed(models.vae, fresh["vae"])
    assert not changed(models.unet, fresh["unet"]) and not changed(models.text_encoder, fresh["text_encoder"])
    info = json.loads((tmp_path / "run" / "vae" / "training.json").read_text())
    config = make_config("toy/base", tmp_path, f"model.vae={tmp_path / 'run'}").model
    vae = load_models(config).vae
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"]) and info["latent_std"] > 0
    assert not changed(vae, models.vae)


def test_decoder_only_finetuning_keeps_the_latent_space(tmp_path):
    trainer = run_training("toy/vae", tmp_path, "train.max_steps=2", "train.batch_size=2",
                           f"data.metadata={tmp_path / 'data' / 'metadata.jsonl'}", "data.toyworld_images=8",
                           "autoencoder.train_encoder=false", "autoencoder.scaling_images=8")
    from personalize.models.toy import build_toy_init

    fresh = build_toy_init()[1]["vae"]
    vae = trainer.inference_models().vae
    same = lambda a, b: all(torch.equal(p.float(), q.float()) for p, q in zip(a.parameters(), b.parameters()))
    assert same(vae.encoder, fresh.encoder) and same(vae.quant_conv, fresh.quant_conv)
    assert not same(vae.decoder, fresh.decoder)
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # the frozen encoder is exported in fp32
    from diffusers import AutoencoderKL

    exported = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae")
    assert exported.config.scaling_factor == fresh.config.scaling_factor


def test_missing_vae_folder_is_a_clear_error(tmp_path):
    from personalize.models import ModelLoadError, load_models

    config = make_config("toy/base", tmp_path, f"model.vae={tmp_path / 'nothing'}").model
    with pytest.raises(ModelLoadError, match="model.vae: .*nothing is not a diffusers AutoencoderKL folder"):
        load_models(config)


def test_shipped_toy_model_loads_in_stock_diffusers_and_samples():
    from diffusers import StableDiffusionPipeline

    from personalize.models.toy import TOY_MODEL_DIR

    if not (TOY_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the pretrained toy model is not in this checkout")
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)  # the model card's own call, as written
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star on the beach", num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.02


def test_shipping_a_new_toy_model_keeps_the_record_of_earlier_stages(tmp_path):
    """eval/toy_model.py --ship replaces the weights; the earlier stages' record (their run folders are
    gone) stays, so the card still says how the VAE and the first U-Net stage were trained."""
    from personalize.config import ModelConfig
    from personalize.models import load_models
    from personalize.workflows.toy_model_card import RUNS_NAME, ship

    load_models(ModelConfig(base="tiny-sd")).pipeline().save_pretrained(tmp_path / "trained")
    target = tmp_path / "shipped"
    target.mkdir()
    (target / RUNS_NAME).write_text(json.dumps({"vae": {"steps": 1500}, "base": {"steps": 3000}}))
    (target / "stale.txt").write_text("from the earlier model")
    ship(tmp_path / "trained", target)
    assert json.loads((target / RUNS_NAME).read_text()) == {"vae": {"steps": 1500}, "base": {"steps": 3000}}
    assert not (target / "stale.txt").exists() and (target / "model_index.json").is_file()
    unet = json.loads((target / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"


def test_card_lists_a_vae_that_is_measured_but_not_shipped(tmp_path):
    """eval/toy_model.py --compare-vae measures another VAE (toy/vae-decoder's output) on the shipped
    VAE's held-out renders, and the card lists its PSNR and training beside the shipped figure."""
    from personalize.config import ModelConfig
    from personalize.models import load_models
    from personalize.workflows.toy_model_card import measure_vae_candidate, model_card
    from personalize.models.toy import TOY_MODEL_DIR

    run = tmp_path / "toy-vae-decoder"
    load_models(ModelConfig(base="tiny-sd")).vae.save_pretrained(run / "vae")
    (run / "run_summary.json").write_text(json.dumps({"steps": 900, "train_seconds": 1010.0}))
    candidate = measure_vae_candidate(run / "vae")
    assert candidate["steps"] == 900 and candidate["min"] <= candidate["median"] and 0 < candidate["mean"] < 60
    measured = json.loads((TOY_MODEL_DIR / "measurements.json").read_text())
    card = model_card({**measured, "vae_candidates": [candidate]}, {}, {})
    assert f"Not shipped: `{run / 'vae'}` (900 steps, 17 min): mean **{candidate['mean']:.1f} dB**" in card
    assert "Not shipped" not in model_card({**measured, "vae_candidates": []}, {}, {})


def test_vae_psnr_by_scene_groups_the_measured_renders():
    """The card breaks the VAE's PSNR down by the renders' scene, lowest first; every render counts once."""
    import numpy as np

    from personalize.workflows.toy_model_card import model_card
    from personalize.models.toy import TOY_MODEL_DIR
    from personalize.toyworld.vae_quality import psnr_by_scene, psnr_specs

    specs = psnr_specs(40)
    psnr = np.array([20.0 if s.scene == "city" else 30.0 for s in specs])
    scenes = psnr_by_scene(psnr, n=40)
    assert list(scenes)[0] == "city" and scenes["city"] == 20.0
    assert set(scenes) == {s.scene or "none" for s in specs} and all(v == 30.0 for k, v in scenes.items() if k != "city")
    measured = json.loads((TOY_MODEL_DIR / "measurements.json").read_text())
    assert "By scene, lowest first" in model_card(measured, {}, {})
    assert "By scene" not in model_card({**measured, "vae_psnr_db": {**measured["vae_psnr_db"], "by_scene": {}}}, {}, {})
