"""DreamBench metrics math and loading, on tiny random encoders built in-process (nothing downloaded)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.metrics import (
    ClipMetric, DinoMetric, MetricWeightsError, SubjectMetrics, dino_transform, load_metrics, pairwise_cosine,
    tiny_clip, tiny_dino,
)
from personalize.metrics.toy import ToyJudgeMetrics, toy_prompt_attributes


def _image(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


class VectorMetrics(SubjectMetrics):
    """Images are keys into a table of embedding vectors (given, not normalized)."""

    image_metric, text_metric = "vec_i", "vec_t"

    def __init__(self, vectors: dict):
        self.vectors = vectors

    def embed_images(self, images):
        return torch.tensor(np.array([self.vectors[i] for i in images]), dtype=torch.float64)

    def embed_texts(self, prompts):
        return torch.tensor(np.array([self.vectors[p] for p in prompts]), dtype=torch.float64)


@pytest.mark.parametrize("build", [tiny_dino, tiny_clip], ids=["dino", "clip"])
def test_identical_images_score_one(build):
    metric = build()
    a, b = _image(0), _image(1)
    assert metric.image_similarity([a], [a]) == pytest.approx(1.0, abs=1e-6)
    assert metric.image_similarity([a, a], [a, a, a]) == pytest.approx(1.0, abs=1e-6)
    assert metric.image_similarity([a], [b]) < 1.0 - 1e-4


def test_orthogonal_embeddings_score_zero():
    metric = VectorMetrics({"red": [1.0, 0, 0], "green": [0, 3.0, 0],
                            "a red dog": [2.0, 0, 0], "a blue dog": [0, 0, 1.0]})
    assert metric.image_similarity(["red"], ["green"]) == pytest.approx(0.0)
    assert metric.text_similarity(["red"], "a blue dog") == pytest.approx(0.0)
    assert metric.text_similarity(["red", "green"], ["a red dog", "a blue dog"]) == pytest.approx(0.5)


def test_pairwise_average_over_sets_of_unequal_size():
    rng = np.random.default_rng(0)
    vectors = {f"g{i}": rng.normal(size=8) for i in range(2)} | {f"r{i}": rng.normal(size=8) for i in range(3)}
    metric = VectorMetrics(vectors)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    expected = np.mean([cos(vectors[f"g{i}"], vectors[f"r{j}"]) for i in range(2) for j in range(3)])
    assert metric.image_similarity(["g0", "g1"], ["r0", "r1", "r2"]) == pytest.approx(expected)
    # the real-images ceiling: distinct pairs only (a photo is not compared with itself)
    refs = ["r0", "r1", "r2"]
    distinct = np.mean([cos(vectors[a], vectors[b]) for a in refs for b in refs if a != b])
    assert metric.reference_similarity(refs) == pytest.approx(distinct)
    with pytest.raises(ValueError):
        pairwise_cosine(torch.ones(1, 3), torch.ones(1, 3), exclude_self=True)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        metric.text_similarity(["g0", "g1"], ["g0", "g1", "g0"])


def test_score_fills_the_metric_columns():
    metric = VectorMetrics({"x": [1.0, 0], "y": [1.0, 1.0], "p": [0, 1.0]})
    scores = metric.score(["x"], ["y"], "p")
    assert set(scores) == {"vec_i", "vec_t"} and scores["vec_i"] == pytest.approx(2 ** -0.5)


def test_reference_preprocessing():
    # DINO's eval transform: short side to 256 (bicubic), center crop 224, ImageNet mean/std
    gray = Image.new("RGB", (300, 500), (128, 128, 128))
    x = dino_transform()(gray)
    assert tuple(x.shape) == (3, 224, 224)
    assert x[0, 100, 100].item() == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-4)
    wide = Image.new("RGB", (512, 256), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 64, 256))  # a white band at the left edge is cropped away
    assert dino_transform(32)(wide).max().item() < 0
    clip = tiny_clip()
    names = [type(t).__name__ for t in clip.preprocess.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and names[-1] == "Normalize"
    assert clip.preprocess.transforms[-1].mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_clip_text_embeddings_use_the_real_tokenizer():
    clip = tiny_clip()
    emb = clip.embed_texts(["a dog in the jungle", "a red dog"])
    assert emb.shape == (2, 32) and not torch.allclose(emb[0], emb[1])


def test_dino_loads_from_a_local_folder(tmp_path):
    metric = tiny_dino(seed=3)
    metric.model.save_pretrained(tmp_path / "dino")
    loaded = DinoMetric.load(str(tmp_path / "dino"))
    images = [_image(0), _image(1)]
    assert torch.allclose(loaded.embed_images(images), metric.embed_images(images), atol=1e-5)
    assert loaded.weights == str(tmp_path / "dino") and metric.describe()["weights"] == "tiny random, seed 3"


def test_clip_loads_an_open_clip_checkpoint_file_or_folder(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from personalize.metrics import TINY_CLIP_CONFIG

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_dir)
    metric = tiny_clip(seed=4)
    weights = tmp_path / "clip" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in metric.model.state_dict().items()}, str(weights))
    images = [_image(0), _image(1)]
    for source in (weights, weights.parent):
        loaded = ClipMetric.load(str(source), model_name="tiny-test-clip")
        assert torch.allclose(loaded.embed_images(images), metric.embed_images(images), atol=1e-5)
        assert torch.allclose(loaded.embed_texts(["a dog"]), metric.embed_texts(["a dog"]), atol=1e-5)
    assert loaded.describe() == {"metric": "ClipMetric", "columns": ["clip_i", "clip_t"], "weights": str(weights)}
    # a pickled state dict: refused unless trusted, then read with the weights-only loader
    pickled = tmp_path / "clip.bin"
    torch.save(metric.model.state_dict(), pickled)
    with pytest.raises(MetricWeightsError, match="--allow-pickle"):
        ClipMetric.load(str(pickled), model_name="tiny-test-clip")
    loaded = ClipMetric.load(str(pickled), model_name="tiny-test-clip", allow_pickle=True)
    assert torch.allclose(loaded.embed_images(images), metric.embed_images(images), atol=1e-5)


@pytest.fixture
def offline_empty_hub_cache(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return empty_hub_cache


def test_offline_without_weights_one_clear_error(offline_empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(MetricWeightsError) as err:
        load_metrics("dreambench")
    message = str(err.value)
    assert time.monotonic() - start < 10
    for needed in ("facebook/dino-vits16", "--dino-weights=", "timm/vit_base_patch32_clip_224.openai",
                   "--clip-weights=", "not on this machine", "hf download"):
        assert needed in message
    with pytest.raises(MetricWeightsError, match="does not exist"):
        DinoMetric.load("./no-such-folder")


def test_cli_reports_missing_metric_weights_without_traceback(offline_empty_hub_cache, tmp_path, capsys):
    from personalize.cli import main

    data = tmp_path / "bench"
    (data / "dog").mkdir(parents=True)
    _image(0).save(data / "dog" / "00.jpg")
    prompts = "\n".join(["Classes", "subject_name,class", "dog,dog", "Prompts", "Object Prompts",
                         "'a {0} {1} in the snow'.format(unique_token, class_token),", "Live Subject Prompts",
                         "'a {0} {1} in the snow'.format(unique_token, class_token),"])
    (data / "prompts_and_classes.txt").write_text(prompts)
    code = main(["eval", "base", "--base", "tiny-sd", "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--dino-weights" in err and "Traceback" not in err


# -- the toy judges behind the same interface ------------------------------------------------------

def test_toy_prompt_attributes():
    assert toy_prompt_attributes("a purple star") == {"class": "star", "color": "purple"}
    assert toy_prompt_attributes("a star wearing a red hat") == {"class": "star", "accessory": "red hat"}
    assert toy_prompt_attributes("a ball on pink fabric") == {"class": "ball", "scene": "pink fabric"}
    assert toy_prompt_attributes("a big kite") == {"class": "kite"}
    assert toy_prompt_attributes("a moon wearing a black top hat") == {"class": "moon", "accessory": "top hat"}


class StubJudges:
    """Reads attributes from a lookup table keyed by the image's first pixel value."""

    def __init__(self, table):
        self.table = table

    def attributes(self, images):
        return [self.table[int(np.asarray(im)[0, 0, 0])] for im in images]

    def prompt_fidelity(self, images, specs):
        return 0.25  # the judges' own, with ImageSpec targets

    def embed(self, images):
        vectors = torch.tensor([[1.0, float(np.asarray(im)[0, 0, 0])] for im in images])
        return torch.nn.functional.normalize(vectors, dim=-1)

    def subject_fidelity(self, generated, references):
        return float((self.embed(generated) @ self.embed(references).T).mean())


def test_toy_judges_adapter():
    seen = {"class": "star", "color": "purple", "scene": None, "accessory": None}
    metric = ToyJudgeMetrics(StubJudges({1: seen, 2: {**seen, "color": "red"}}))
    one, two = (np.full((64, 64, 3), v, dtype=np.uint8) for v in (1, 2))
    assert metric.names == ["subject_fidelity", "prompt_fidelity"]
    assert metric.text_similarity([one, two], "a purple star") == 0.5
    assert metric.text_similarity([one, two], "a star") == 1.0
    assert metric.text_similarity([one], "a star in the snow") == 0.0
    from personalize.toyworld.world import ImageSpec

    assert metric.text_similarity([one], [ImageSpec.__new__(ImageSpec)]) == 0.25  # specs go to the judges as is
    assert metric.image_similarity([one], [one]) == pytest.approx(1.0)
