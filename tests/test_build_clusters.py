"""Tests for the in-context cluster builder (personalize/data/cluster_builder.py and
data_tools/build_clusters.py) on tiny images written to tmp_path, with a fake embedder (an image's
mean color) and, end to end, the toy world's identity judge on renders of held-out subjects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data.cluster_builder import (
    BadRecordsError, build_manifest, normalize_source_url, stats_path)
from personalize.data.clusters import read_manifest
from personalize.data.images import DataError

from conftest import load_script

RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


class MeanColor:
    """A fake embedder: an image's mean RGB color. Images of one color have similarity 1, of red,
    green and blue about 0.2. Records how many images each call got."""

    def __init__(self):
        self.calls: list[int] = []

    def embed_images(self, images) -> torch.Tensor:
        self.calls.append(len(images))
        return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in images])


def png(path: Path, color=RED, size=16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(path)
    return path


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def clusters_of(manifest: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in read_manifest(manifest):
        out.setdefault(r.cluster, []).append(r.path.name)
    return out


# -- sources --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, key", [
    ("HTTPS://Example.COM/shop/dog/", "https://example.com/shop/dog"),
    ("https://example.com/shop/dog#photos", "https://example.com/shop/dog"),
    ("https://example.com/shop/dog?id=3", "https://example.com/shop/dog?id=3"),
    ("https://example.com/", "https://example.com"),
    ("https://example.com/Shop/Dog", "https://example.com/Shop/Dog"),  # the path keeps its case
])
def test_normalize_source_url(url, key):
    assert normalize_source_url(url) == key


def test_normalize_source_url_refuses_a_relative_url():
    with pytest.raises(ValueError, match="not an absolute URL"):
        normalize_source_url("example.com/shop")


def test_folder_tree_clusters_by_subfolder_with_caption_files(tmp_path):
    root = tmp_path / "photos"
    for name in ("b.png", "a.png", "c.png"):
        png(root / "dog" / name, RED)
    (root / "dog" / "a.txt").write_text("a dog on grass\n")
    png(root / "cat" / "x.png", BLUE), png(root / "cat" / "y.jpg", BLUE)
    (root / "notes").mkdir()  # no images: no cluster
    manifest = tmp_path / "out" / "clusters.jsonl"

    result = build_manifest(root, manifest, MeanColor(), default_caption="a photo")

    assert clusters_of(manifest) == {"cat": ["x.png", "y.jpg"], "dog": ["a.png", "b.png", "c.png"]}
    texts = {r.path.name: r.text for r in read_manifest(manifest)}
    assert texts["a.png"] == "a dog on grass" and texts["b.png"] == "a photo"
    stats = json.loads(stats_path(manifest).read_text())
    assert stats_path(manifest) == tmp_path / "out" / "clusters.stats.json"
    assert stats["records_read"] == 5 and stats["clusters_found"] == 2 and stats["clusters_kept"] == 2
    assert stats["mean_similarity_kept"] == pytest.approx(1.0, abs=1e-3)
    assert result.stats.records_written == 5
    assert "kept 2 clusters (5 records, mean similarity 1.000)" in result.stats.summary()
    assert "below similarity" not in result.stats.summary() and "truncated" not in result.stats.summary()


def test_folder_tree_without_caption_is_a_bad_record(tmp_path):
    png(tmp_path / "photos" / "dog" / "a.png"), png(tmp_path / "photos" / "dog" / "b.png")
    with pytest.raises(BadRecordsError, match=r"a\.png: no caption file a\.txt and no --default-caption"):
        build_manifest(tmp_path / "photos", tmp_path / "m.jsonl", MeanColor())


def test_jsonl_clusters_by_normalized_source_url(tmp_path):
    for name, color in (("1.png", RED), ("2.png", RED), ("3.png", RED), ("4.png", BLUE), ("5.png", BLUE)):
        png(tmp_path / "data" / "img" / name, color)
    jsonl = write_jsonl(tmp_path / "data" / "records.jsonl", [
        {"file_name": "img/1.png", "text": "a red mug", "url": "https://Shop.example.com/mug/"},
        {"file_name": "img/2.png", "text": "a red mug on a desk", "url": "https://shop.example.com/mug#gallery",
         "context": "desk"},
        "",  # blank lines are ignored
        {"file_name": "img/3.png", "text": "a red mug", "url": "HTTPS://shop.example.com/mug"},
        {"file_name": "img/1.png", "text": "a red mug again", "url": "https://shop.example.com/mug"},  # repeated
        {"file_name": "img/4.png", "text": "a blue hat", "url": "https://other.example.org/hat"},
        {"file_name": "img/5.png", "text": "a blue hat", "url": "https://other.example.org/hat"},
    ])
    manifest = tmp_path / "data" / "clusters.jsonl"

    result = build_manifest(jsonl, manifest, MeanColor())

    assert result.stats.duplicate_records == 1 and result.stats.records_read == 6
    assert clusters_of(manifest) == {"https://other.example.org/hat": ["4.png", "5.png"],
                                     "https://shop.example.com/mug": ["1.png", "2.png", "3.png"]}
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines[0]["file_name"] == "img/4.png"  # relative to the manifest's folder
    assert [r.context for r in read_manifest(manifest) if r.path.name == "2.png"] == ["desk"]
    assert [r.text for r in read_manifest(manifest) if r.path.name == "1.png"] == ["a red mug"]  # the first kept


# -- filters --------------------------------------------------------------------------------------

def test_incoherent_cluster_is_dropped_and_the_stats_say_why(tmp_path):
    for i in range(3):
        png(tmp_path / "photos" / "same" / f"{i}.png", RED)
    for i, color in enumerate((RED, GREEN, BLUE)):
        png(tmp_path / "photos" / "mixed" / f"{i}.png", color)
    manifest = tmp_path / "clusters.jsonl"

    result = build_manifest(tmp_path / "photos", manifest, MeanColor(), default_caption="x", min_similarity=0.8)

    assert set(clusters_of(manifest)) == {"same"}
    stats = json.loads(stats_path(manifest).read_text())
    low = stats["clusters_dropped"]["low_similarity"]
    assert low["count"] == 1 and low["min_similarity"] == 0.8
    assert list(low["clusters"]) == ["mixed"] and low["clusters"]["mixed"] < 0.5
    assert stats["clusters_found"] == 2 and stats["clusters_kept"] == 1
    assert stats["kept"] == {"same": {"size": 3, "similarity": pytest.approx(1.0, abs=1e-3)}}
    assert "1 below similarity 0.8" in result.stats.summary()


def test_min_and_max_size(tmp_path):
    for i in range(5):
        png(tmp_path / "photos" / "big" / f"{i}.png", RED)
    png(tmp_path / "photos" / "lonely" / "0.png", RED)
    for i in range(2):
        png(tmp_path / "photos" / "pair" / f"{i}.png", BLUE)
    manifest = tmp_path / "clusters.jsonl"
    embedder = MeanColor()

    build_manifest(tmp_path / "photos", manifest, embedder, default_caption="x", min_size=2, max_size=3,
                   batch_size=1)

    assert clusters_of(manifest) == {"big": ["0.png", "1.png", "2.png"], "pair": ["0.png", "1.png"]}
    assert embedder.calls == [3, 2]  # the truncated cluster only; the one too small is never embedded
    stats = json.loads(stats_path(manifest).read_text())
    assert stats["clusters_dropped"]["too_small"] == {"count": 1, "min_size": 2, "clusters": {"lonely": 1}}
    assert stats["clusters_truncated"] == 1 and stats["records_written"] == 5


def test_small_clusters_are_embedded_together_with_the_same_result(tmp_path):
    for cluster, color in (("a", RED), ("b", GREEN), ("c", BLUE)):
        for i in range(2):
            png(tmp_path / "photos" / cluster / f"{i}.png", color)
    one, batched = MeanColor(), MeanColor()
    by_one = build_manifest(tmp_path / "photos", tmp_path / "one.jsonl", one, default_caption="x", batch_size=1)
    together = build_manifest(tmp_path / "photos", tmp_path / "all.jsonl", batched, default_caption="x")
    assert one.calls == [2, 2, 2] and batched.calls == [6]
    assert by_one.records == together.records


def test_size_options_are_checked(tmp_path):
    png(tmp_path / "photos" / "a" / "0.png")
    with pytest.raises(DataError, match="--min-size: 1"):
        build_manifest(tmp_path / "photos", tmp_path / "m.jsonl", MeanColor(), default_caption="x", min_size=1)
    with pytest.raises(DataError, match="--max-size: 2 is below --min-size 3"):
        build_manifest(tmp_path / "photos", tmp_path / "m.jsonl", MeanColor(), default_caption="x", min_size=3,
                       max_size=2)


def test_nothing_kept_is_an_error_and_writes_nothing(tmp_path):
    for i, color in enumerate((RED, GREEN)):
        png(tmp_path / "photos" / "mixed" / f"{i}.png", color)
    png(tmp_path / "photos" / "lonely" / "0.png")
    manifest = tmp_path / "clusters.jsonl"
    manifest.write_text("previous\n")
    with pytest.raises(DataError, match=r"no cluster kept of 2: 1 too small .* 1 below --min-similarity 0\.9"):
        build_manifest(tmp_path / "photos", manifest, MeanColor(), default_caption="x", min_similarity=0.9)
    assert manifest.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.jsonl", "photos"]


# -- bad records ----------------------------------------------------------------------------------

def good_records(folder: Path, n: int = 3) -> list[dict]:
    return [{"file_name": png(folder / f"{i}.png").name, "text": "a mug", "url": "https://a.example/mug"}
            for i in range(n)]


def test_bad_jsonl_line_is_an_error_naming_the_line(tmp_path):
    records = good_records(tmp_path)
    jsonl = write_jsonl(tmp_path / "records.jsonl", [records[0], '{"file_name": "1.png", "text": ', records[1],
                                                     {"file_name": "2.png", "text": "a mug"}])
    manifest = tmp_path / "clusters.jsonl"
    with pytest.raises(BadRecordsError) as caught:
        build_manifest(jsonl, manifest, MeanColor())
    message = str(caught.value)
    assert "2 bad record(s) (skip them with --skip-bad)" in message
    assert f"{jsonl} line 2: not JSON" in message
    assert f"{jsonl} line 4: missing 'url' (need file_name, text, url)" in message
    assert not manifest.exists() and not stats_path(manifest).exists()


def test_unreadable_image_is_an_error_naming_the_file(tmp_path):
    png(tmp_path / "photos" / "dog" / "a.png"), png(tmp_path / "photos" / "dog" / "b.png")
    broken = tmp_path / "photos" / "dog" / "c.png"
    broken.write_text("not a png")
    with pytest.raises(BadRecordsError, match=re.escape(f"{broken}: not an image")):
        build_manifest(tmp_path / "photos", tmp_path / "m.jsonl", MeanColor(), default_caption="x")

    records = good_records(tmp_path / "j")
    records[1]["file_name"] = "missing.png"
    jsonl = write_jsonl(tmp_path / "j" / "records.jsonl", records)
    with pytest.raises(BadRecordsError, match=r"line 2 \(.*missing\.png\): file does not exist"):
        build_manifest(jsonl, tmp_path / "m.jsonl", MeanColor())


def test_skip_bad_skips_and_counts(tmp_path):
    records = good_records(tmp_path, 4)
    records[3]["file_name"] = "empty.png"
    (tmp_path / "empty.png").write_bytes(b"")
    jsonl = write_jsonl(tmp_path / "records.jsonl", [*records, "[1, 2]", {**records[0], "url": "no-scheme"}])
    manifest = tmp_path / "clusters.jsonl"

    result = build_manifest(jsonl, manifest, MeanColor(), skip_bad=True)

    assert clusters_of(manifest) == {"https://a.example/mug": ["0.png", "1.png", "2.png"]}
    stats = json.loads(stats_path(manifest).read_text())
    assert stats["records_read"] == 6 and stats["records_skipped_bad"] == 3
    assert [b.split(": ", 1)[1] for b in stats["bad_records"]] == [
        "a record is a JSON object, got list", "url 'no-scheme' is not an absolute URL (need scheme://host/...)",
        "empty file (0 bytes)"]
    assert "3 skipped as bad" in result.stats.summary()


# -- the script -----------------------------------------------------------------------------------

def test_script_keeps_renders_of_one_toy_subject_together(tmp_path, capsys):
    from personalize.toyworld.world import heldout_subjects, render, sample_spec

    rng = np.random.default_rng(0)
    subjects = heldout_subjects()[:3]
    root = tmp_path / "renders"
    for subject in subjects:
        for i in range(3):
            save(root / subject.name / f"{i}.png", render(sample_spec(rng, subject)))
    for i, subject in enumerate(subjects):  # one source showing three different subjects
        save(root / "mixed" / f"{i}.png", render(sample_spec(rng, subject)))
    manifest = tmp_path / "clusters.jsonl"

    code = load_script("data_tools/build_clusters.py").main([str(root), str(manifest), "--embedder", "toy", "--default-caption", "a toy",
                               "--min-similarity", "0.3", "--no-progress"])

    assert code == 0
    assert clusters_of(manifest) == {s.name: ["0.png", "1.png", "2.png"] for s in subjects}
    stats = json.loads(stats_path(manifest).read_text())
    assert list(stats["clusters_dropped"]["low_similarity"]["clusters"]) == ["mixed"]
    assert stats["mean_similarity_kept"] > 0.5
    out = capsys.readouterr().out
    assert "kept 3 clusters (9 records" in out and f"wrote {manifest}" in out


def test_script_reports_user_errors(tmp_path, capsys):
    script = load_script("data_tools/build_clusters.py")
    assert script.main([str(tmp_path / "nowhere"), str(tmp_path / "m.jsonl"), "--embedder", "toy"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert script.main([str(tmp_path), str(tmp_path / "m.jsonl"), "--clip-weights", str(tmp_path / "no.pt")]) == 2
    assert f"--clip-weights: {tmp_path / 'no.pt'} does not exist" in capsys.readouterr().err


def test_apprenticeship_keeps_the_best_generations_and_resumes(tmp_path, monkeypatch):
    """Experts (tiny LoRA, 2 steps) per cluster; the output manifest has the cluster images as examples and
    the best quarter of the generations as targets; a rerun trains nothing."""
    import shutil

    from personalize.workflows.apprenticeship import ApprenticeshipSettings, run_apprenticeship
    from personalize.data.clusters import ClusterDataset, ClusterRecord, read_manifest, write_manifest
    from personalize.metrics import load_metrics

    subject = Path("recipes/tiny/subject")
    records = []
    for c in ("a", "b"):
        for i, image in enumerate(sorted(subject.glob("*.png"))[:3]):
            (tmp_path / "src").mkdir(exist_ok=True)
            shutil.copyfile(image, tmp_path / "src" / f"{c}{i}.png")
            records.append(ClusterRecord(c, tmp_path / "src" / f"{c}{i}.png", f"a toy in room {i}", f"ctx{i}", "toy"))
    manifest = write_manifest(records, tmp_path / "src" / "manifest.jsonl")
    settings = ApprenticeshipSettings(out=str(tmp_path / "out"), expert_recipe="tiny/lora",
                                      templates=("a {} in the snow", "a {} on the beach"), images_per_prompt=2,
                                      keep_fraction=0.25, steps=2, overrides=("train.max_steps=2", "prior.enabled=false",
                                                                              "train.progress_bar=false"))
    out = run_apprenticeship(manifest, settings, load_metrics("tiny"), log=lambda m: None)
    written = read_manifest(out)
    assert [r.role for r in written].count("example") == 6 and [r.role for r in written].count("target") == 2
    target = next(r for r in written if r.role == "target")
    assert target.path.is_file() and target.text in ("a toy in the snow", "a toy on the beach")
    assert ClusterDataset(written, 2, 64).stats["targets"] == 2  # only generations are targets
    captions = sorted(p.read_text().strip() for p in (tmp_path / "out" / "clusters" / "a" / "instance-images").glob("*.txt"))
    assert captions == [f"a sks toy in room {i}" for i in range(3)]  # the expert learned each example's own caption
    from personalize.training import trainer

    monkeypatch.setattr(trainer.Trainer, "train", lambda self: (_ for _ in ()).throw(AssertionError("retrained")))
    assert read_manifest(run_apprenticeship(manifest, settings, load_metrics("tiny"), log=lambda m: None)) == written
