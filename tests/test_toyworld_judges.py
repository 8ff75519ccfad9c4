"""ToyBench's judges: the image conversion, the metric math on untrained judges, save/load, and (when the
shipped judges are in this checkout) that they read fresh renders right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.toyworld.judge import Judges, to_tensor
from personalize.models.toy import TOY_JUDGES
from personalize.toyworld.world import ImageSpec, heldout_subjects, render, sample_spec

torch.set_num_threads(1)


def _renders(n: int, seed: int, subject=None) -> tuple[list[ImageSpec], np.ndarray]:
    rng = np.random.default_rng([99, seed])
    specs = [sample_spec(rng, subject) for _ in range(n)]
    return specs, np.stack([render(s) for s in specs])


@pytest.fixture
def fresh_judges() -> Judges:
    torch.manual_seed(0)
    return Judges.create(width=8, dim=16)


def test_to_tensor_reads_arrays_pil_images_and_tensors_alike():
    _, images = _renders(3, seed=0)
    x = to_tensor(images)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_tensor(images[0]), x[:1])
    assert torch.equal(to_tensor([Image.fromarray(i) for i in images]), x)
    assert torch.equal(to_tensor(Image.fromarray(images[1])), x[1:2])
    assert torch.equal(to_tensor(x), x) and torch.equal(to_tensor(list(x)), x)
    big = to_tensor(Image.fromarray(images[0]).resize((128, 128), Image.NEAREST))
    assert big.shape == (1, 3, 64, 64) and (big - x[:1]).abs().mean() < 0.05
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(images.astype(np.float32))
    with pytest.raises(ValueError, match="no images"):
        to_tensor([])


def test_subject_fidelity_is_the_mean_pairwise_cosine(fresh_judges):
    _, images = _renders(5, seed=1)
    same = np.repeat(images[:1], 3, axis=0)
    assert fresh_judges.subject_fidelity(same, same) == pytest.approx(1.0, abs=1e-5)
    embeddings = fresh_judges.embed(images)
    assert embeddings.shape == (5, 16)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)
    expected = (embeddings[:2] @ embeddings[2:].T).mean()
    assert fresh_judges.subject_fidelity(images[:2], images[2:]) == pytest.approx(float(expected), abs=1e-5)
    assert fresh_judges.identify(images[:2], [images[:1], images[1:2]]).tolist() == [0, 1]


def test_prompt_fidelity_checks_only_the_attributes_the_prompt_asks_for(fresh_judges, monkeypatch):
    predicted = [{"class": "star", "color": "red", "scene": "beach", "accessory": None}] * 4
    monkeypatch.setattr(fresh_judges, "attributes", lambda images: predicted)
    specs = [
        ImageSpec("star", "red"),  # no scene, no accessory asked: the beach and no hat are fine
        ImageSpec("star", "red", scene="beach"),
        ImageSpec("star", "red", scene="snow"),  # asked for snow, shows the beach
        ImageSpec("star", "red", accessory="top hat"),  # asked for a hat, shows none
    ]
    assert fresh_judges.prompt_fidelity(np.zeros((4, 64, 64, 3), np.uint8), specs) == pytest.approx(0.5)
    assert fresh_judges.prompt_fidelity(None, [ImageSpec("ball", "red")] * 4) == 0.0
    accuracy = fresh_judges.attribute_accuracy(None, specs)
    assert accuracy == {"class": 1.0, "color": 1.0, "scene": 0.25, "accessory": 0.75}  # "none" counts there


def test_judges_save_and_load_with_their_config_and_report(fresh_judges, tmp_path):
    _, images = _renders(4, seed=2)
    fresh_judges.report = {"identity": {"top-1": 0.5}}
    path = fresh_judges.save(tmp_path / "judges.safetensors")
    loaded = Judges.load(path)
    assert loaded.report == fresh_judges.report and loaded.config == fresh_judges.config
    assert torch.allclose(loaded.embed(images), fresh_judges.embed(images), atol=1e-6)
    assert loaded.attributes(images) == fresh_judges.attributes(images)
    assert set(loaded.attributes(images)[0]) == {"class", "color", "scene", "accessory"}
    with pytest.raises(FileNotFoundError, match="train_judges.py"):
        Judges.load(tmp_path / "missing.safetensors")


shipped = pytest.mark.skipif(not TOY_JUDGES.is_file(),
                             reason=f"no shipped judges at {TOY_JUDGES}: train them with eval/train_judges.py")


@shipped
def test_shipped_judges_read_fresh_renders():
    judges = Judges.load()
    assert TOY_JUDGES.stat().st_size < 8e6
    object_specs, objects = _renders(30, seed=3)
    subject_specs = [s for i, subject in enumerate(heldout_subjects()[:5]) for s in _renders(4, 10 + i, subject)[0]]
    specs = object_specs + subject_specs
    images = np.concatenate([objects, np.stack([render(s) for s in subject_specs])])
    accuracy = judges.attribute_accuracy(images, specs)
    assert all(acc >= 0.9 for acc in accuracy.values()), accuracy


@shipped
def test_shipped_judges_reidentify_the_heldout_subjects():
    judges = Judges.load()
    subjects = heldout_subjects()
    galleries = [_renders(4, 20 + i, subject)[1] for i, subject in enumerate(subjects)]
    queries = np.concatenate([_renders(2, 40 + i, subject)[1] for i, subject in enumerate(subjects)])
    truth = torch.arange(len(subjects)).repeat_interleave(2)
    assert (judges.identify(queries, galleries) == truth).float().mean() >= 0.9
    own = np.mean([judges.subject_fidelity(queries[2 * i:2 * i + 2], g) for i, g in enumerate(galleries)])
    other = np.mean([judges.subject_fidelity(queries[2 * i:2 * i + 2], galleries[(i + 1) % 12]) for i in range(12)])
    assert own > other + 0.3


class _FakeVAE:
    """encode -> latent_dist.mean -> decode -> sample, with ``decode`` applying ``fn`` to the pixels."""

    def __init__(self, fn):
        self.fn = fn

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})()})()

    def decode(self, z):
        return type("Out", (), {"sample": self.fn(z)})()


def test_subject_fidelity_through_vae_compares_ceiling_renders_with_their_reconstructions():
    from personalize.workflows.toy_model_card import subject_fidelity_through_vae

    judges = Judges.load(TOY_JUDGES)
    perfect = subject_fidelity_through_vae(_FakeVAE(lambda x: x), judges, n_images=1)
    assert perfect["subjects"] == len(heldout_subjects()) and perfect["images_per_subject"] == 20
    assert perfect["through_vae"] == pytest.approx(perfect["real"], abs=1e-3)  # a lossless VAE costs nothing
    assert 0.6 < perfect["real"] < 0.95  # the ceiling row: real renders in new scenes vs the references
    grey = subject_fidelity_through_vae(_FakeVAE(lambda x: torch.zeros_like(x)), judges, n_images=1)
    assert grey["real"] == pytest.approx(perfect["real"])
    assert grey["through_vae"] < perfect["real"] - 0.3  # a VAE that loses the image loses the subject
