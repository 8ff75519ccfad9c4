"""Caching, class images, captions, validation images, logging, and clear CLI errors."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_config, run_training
from personalize.data.datasets import StepBatchSampler, folder_examples, jsonl_examples
from personalize.data.images import DataError

FAST = ["train.checkpoint_every=0", "validation.prompts=[]"]


@pytest.mark.parametrize("recipe, extra", [
    ("tiny/lora", []),
    ("tiny/dreambooth", ["prior.num_class_images=2"]),
])
def test_cache_on_and_off_give_the_same_losses(tmp_path, recipe, extra):
    extra = [*extra, f"prior.class_images={tmp_path / 'class'}"] if "dreambooth" in recipe else extra
    off = run_training(recipe, tmp_path / "off", *FAST, "train.max_steps=4", "data.cache=false", *extra)
    on = run_training(recipe, tmp_path / "on", *FAST, "train.max_steps=4", "data.cache=true", *extra)
    assert on.method.text_cache is not None and off.method.text_cache is None
    # the first step sees identical inputs; later steps drift only by float rounding that Adam's
    # normalisation amplifies (encoding one image vs a batch rounds differently in the last bits)
    assert off.history[0]["loss"] == pytest.approx(on.history[0]["loss"], rel=1e-6)
    for a, b in zip(off.history, on.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_text_cache_fills_in_batches_with_the_encodings_of_single_prompts(tmp_path):
    """TextCache.fill encodes many prompts per text-encoder call (a run's 18,000 toy captions took
    minutes one at a time); each prompt's entry equals its encoding alone, and a second fill encodes
    only the new prompts."""
    from personalize.data.cache import TextCache

    models = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=1", "data.cache=true").models
    prompts = ["a photo of sks dog", "a dog", "", "a dog in the snow wearing a red hat", "sks"]
    calls = []
    encode = models.encode_text
    models.encode_text = lambda ids: calls.append(len(ids[0])) or encode(ids)
    cache = TextCache(models)
    cache.fill(prompts, batch_size=2)
    assert calls == [2, 2, 1]
    for prompt in prompts:
        alone = encode(models.tokenize([prompt]))
        for key, value in alone.items():
            torch.testing.assert_close(cache.entries[prompt][key], value[0].float(), atol=1e-5, rtol=1e-5)
    cache.fill([*prompts, "a new prompt"])
    assert calls == [2, 2, 1, 1] and len(cache.entries) == 6


def test_latent_cache_is_kept_on_disk_and_reused_only_while_valid(tmp_path, monkeypatch):
    from personalize.models import Models

    first = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=1", "data.cache=true")
    cache_file = tmp_path / "run" / "cache" / "latents-0.safetensors"
    assert cache_file.is_file()
    calls = []
    original = Models.encode_images
    monkeypatch.setattr(Models, "encode_images", lambda self, x: calls.append(len(x)) or original(self, x))
    again = run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=1", "data.cache=true", "train.overwrite=true")
    assert calls == [] and again.history[0]["loss"] == first.history[0]["loss"]  # read from disk
    run_training("tiny/lora", tmp_path, *FAST, "train.max_steps=1", "data.cache=true", "data.resolution=32",
                 "train.overwrite=true")
    assert calls  # another resolution: encoded again


def test_class_images_are_generated_once_and_reused(tmp_path):
    class_dir = tmp_path / "class"
    overrides = [*FAST, "train.max_steps=1", f"prior.class_images={class_dir}", "prior.num_class_images=3"]
    run_training("tiny/dreambooth", tmp_path / "a", *overrides)
    files = sorted(class_dir.glob("*.png"))
    assert len(files) == 3 and all(Image.open(f).size == (64, 64) for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    trainer = make_config("tiny/dreambooth", tmp_path / "b", *overrides)
    from personalize.training.trainer import Trainer

    t = Trainer(trainer)
    assert t.method.needs_class_images() == 0  # a second run generates none
    t.train()
    assert [f.stat().st_mtime_ns for f in sorted(class_dir.glob("*.png"))] == stamps


def test_validation_grid_and_tensorboard(tmp_path):
    run_training("tiny/lora", tmp_path, "train.max_steps=4", "train.checkpoint_every=0", "validation.every=2",
                 "train.report_to=tensorboard", "validation.num_images_per_prompt=2")
    grids = sorted((tmp_path / "run" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size == (128, 64)  # 1 prompt x 2 images of 64 px
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))


def test_captions_beside_images_and_jsonl(tmp_path):
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("a red sks toy\n")
    examples = folder_examples(tmp_path, "a sks toy", ".txt", "data.instance_images")
    assert [e.prompt for e in examples] == ["a red sks toy", "a sks toy"]
    with pytest.raises(DataError, match="1.png has no caption file"):
        folder_examples(tmp_path, None, ".txt", "data.instance_images")
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"file_name": "0.png", "text": "ok"}\n{"file_name": "1.png"}\nnot json\n')
    with pytest.raises(DataError, match=r"(?s)line 2: missing 'text'.*line 3: not JSON"):
        jsonl_examples(bad)


def test_global_batches_do_not_depend_on_process_count():
    one = iter(StepBatchSampler(10, batch_size=4, seed=3))
    r0, r1 = iter(StepBatchSampler(10, 2, 3, rank=0, world_size=2)), iter(StepBatchSampler(10, 2, 3, rank=1, world_size=2))
    for _ in range(6):  # crosses epoch boundaries
        assert next(one) == next(r0) + next(r1)
    resumed = iter(StepBatchSampler(10, 4, 3, start_batch=3))
    again = iter(StepBatchSampler(10, 4, 3))
    for _ in range(3):
        next(again)
    assert next(resumed) == next(again)


def test_prior_preservation_loss_is_reported(tmp_path):
    trainer = run_training("tiny/dreambooth", tmp_path, *FAST, "train.max_steps=2", "prior.num_class_images=2",
                           f"prior.class_images={tmp_path / 'class'}", "prior.prior_loss_weight=0.5")
    assert {"diffusion_loss", "prior_loss", "loss"} <= set(trainer.history[0])
    h = trainer.history[0]
    assert h["loss"] == pytest.approx(h["diffusion_loss"] + h["prior_loss"], rel=1e-5)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "personalize", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_errors_are_clear_not_tracebacks(tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64)).save(bad_dir / "good.png")
    cases = [
        (["train", "tiny/lora", "lora.rnak=4"], "did you mean 'rank'"),
        (["train", "tiny/lora", f"data.instance_images={bad_dir}", f"train.output_dir={tmp_path / 'o'}"],
         "2 bad image(s)"),
        (["train", "tiny/lora", f"data.instance_images={tmp_path / 'nothing'}"], "does not exist"),
        (["train", "tiny/lora", "model.base=someorg/some-model"], "not on this machine"),
        (["train", "tiny/lora", "model.base=./missing/model.ckpt"], "does not exist"),
        (["train", "tiny/lora", "train.mixed_precision=fp16"], "fp16 needs a CUDA"),
    ]
    for args, message in cases:  # each into a fresh folder, whatever outputs/ of the checkout holds
        result = _cli(*args, *([] if any(a.startswith("train.output_dir=") for a in args) else
                               [f"train.output_dir={tmp_path / 'out'}"]))
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_pickled_checkpoint_is_refused_by_the_cli(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    result = _cli("train", "tiny/lora", f"model.base={ckpt}", f"train.output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "allow_pickle" in result.stderr and "Traceback" not in result.stderr
