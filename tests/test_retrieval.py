"""Tests for retrieval (personalize/retrieval/ and data_tools/build_index.py): a flat index over a small
toy named collection queried by name and by image with the toy embedder; reproducible files; the
embedder check; the missing-faiss message; ivf and hnsw indexes over random vectors of a fake embedder;
bad collections."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss", reason="retrieval needs faiss: pip install faiss-cpu")

from personalize.data.cluster_builder import BadRecordsError  # noqa: E402
from personalize.data.images import DataError  # noqa: E402
from personalize.retrieval import (  # noqa: E402
    IMAGE_INDEX, META, RECORDS, TEXT_INDEX, Embedder, FaissMissingError, OpenClipEmbedder, RetrievalError,
    RetrievalIndex, ToyEmbedder, build_index, query, toy_names, toy_named_collection)
from personalize.toyworld.world import HELDOUT_NAMES, render, sample_spec, training_subject  # noqa: E402

from conftest import load_script  # noqa: E402

FILES = (TEXT_INDEX, IMAGE_INDEX, RECORDS, META)


class FakeEmbedder(Embedder):
    """Random unit vectors, fixed by the text or the image's pixels (and ``seed``): a text or image finds
    itself. ``name`` and ``seed`` (its "weights") can be set to test the embedder check."""

    def __init__(self, dim: int = 16, seed: int = 0, name: str = "fake"):
        self.dim, self.seed, self.name = dim, seed, name

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"fake-weights-{self.seed}".encode()).hexdigest()

    def _vector(self, data: bytes) -> torch.Tensor:
        digest = hashlib.sha256(data).digest()
        rng = np.random.default_rng([self.seed, *digest[:8]])
        return torch.from_numpy(rng.standard_normal(self.dim).astype(np.float32))

    def embed_texts(self, texts):
        return torch.stack([self._vector(t.encode()) for t in texts])

    def embed_images(self, images):
        return torch.stack([self._vector(np.asarray(im).tobytes()) for im in images])


def color_png(path: Path, number: int) -> Path:
    """An 8x8 image whose color encodes ``number`` (distinct pixels for distinct numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (number % 256, number // 256 % 256, 7)
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(path)
    return path


def random_collection(folder: Path, n: int) -> Path:
    """A JSONL collection of ``n`` tiny images with captions "record N"."""
    lines = []
    for i in range(n):
        color_png(folder / "images" / f"{i:04d}.png", i)
        lines.append(json.dumps({"file_name": f"images/{i:04d}.png", "text": f"record {i}"}))
    (folder / "collection.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "collection.jsonl"


def file_bytes(index_dir: Path) -> dict[str, bytes]:
    return {name: (index_dir / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy named collection (20 subjects x 4 renders), the toy embedder and a flat index over both."""
    root = tmp_path_factory.mktemp("toy-retrieval")
    subjects = toy_named_collection(root / "collection", n_subjects=20, per_subject=4, seed=0)
    embedder = ToyEmbedder()
    result = build_index(root / "collection", root / "index", embedder, kind="auto")
    return {"root": root, "subjects": subjects, "embedder": embedder, "index": root / "index", "result": result,
            "collection": root / "collection"}


def test_toy_named_collection_and_names():
    names = toy_names(400, seed=0)
    assert len(set(names)) == 400 and names == toy_names(400, seed=0)
    assert toy_names(30, seed=0) == names[:30] and toy_names(30, seed=1) != names[:30]
    assert not set(names) & set(HELDOUT_NAMES)
    assert all(name.isalpha() and name.islower() for name in names)


def test_flat_index_answers_name_and_image_queries(toy):
    meta = json.loads((toy["index"] / META).read_text())
    assert meta["kind"] == "flat" and meta["count"] == 80 and meta["dims"] == {"text": 128, "image": 128}
    assert meta["embedder"] == {"name": toy["embedder"].name, "fingerprint": toy["embedder"].fingerprint}
    first = json.loads((toy["index"] / RECORDS).read_text().splitlines()[0])
    assert not Path(first["path"]).is_absolute()  # relative to the index folder

    found = []
    for subject in toy["subjects"]:  # "vafuplab the heart" -> that subject's renders
        hits = query(toy["index"], text=subject.query, k=5, embedder=toy["embedder"], root=toy["collection"])
        assert len(hits) == 5 and hits[0][1] >= hits[-1][1]
        mine = {str(f) for f in subject.files}
        assert hits[0][0]["path"] in mine, (subject.query, [h[0]["text"] for h in hits])
        found.append(sum(record["path"] in mine for record, _ in hits))
        record = hits[0][0]
        assert Path(record["path"]).is_file()
        assert Path(record["path"]).with_suffix(".txt").read_text().strip() == record["text"]
        assert subject.name in record["text"]
    assert min(found) >= 3 and sum(found) >= 0.95 * 4 * len(toy["subjects"]), found
    assert RetrievalIndex(toy["index"]).meta["count"] == 80

    # image -> image: a fresh render (not in the index) of each of a few subjects, as pixels, PIL or a file
    for subject in toy["subjects"][:5]:
        pixels = render(sample_spec(np.random.default_rng([99, subject.subject]), training_subject(subject.subject)))
        Image.fromarray(pixels).save(toy["root"] / "query.png")
        for image in (pixels, Image.fromarray(pixels), str(toy["root"] / "query.png")):
            hits = query(toy["index"], image=image, k=4, embedder=toy["embedder"], root=toy["collection"])
            assert hits[0][0]["path"] in {str(f) for f in subject.files}
    # without an embedder, the one index.json names is built (the zero-shot CLI's path)
    assert query(toy["index"], text=toy["subjects"][0].query, k=1, root=toy["collection"])[0][0]["path"] == \
        query(toy["index"], text=toy["subjects"][0].query, k=1, embedder=toy["embedder"],
              root=toy["collection"])[0][0]["path"]


def test_building_twice_gives_identical_files(toy):
    again = build_index(toy["root"] / "collection", toy["root"] / "index-again", toy["embedder"])
    assert file_bytes(again.index_dir) == file_bytes(toy["index"])


def test_query_with_another_embedder_is_a_clear_error(toy, tmp_path):
    with pytest.raises(RetrievalError) as err:
        query(toy["index"], text="zorbo the star", embedder=FakeEmbedder(dim=128))
    message = str(err.value)
    assert "'toy:text-tokens+identity'" in message and "'fake'" in message and str(toy["index"] / META) in message

    source = random_collection(tmp_path, 10)
    build_index(source, tmp_path / "index", FakeEmbedder(seed=0))
    other_weights = FakeEmbedder(seed=1)
    with pytest.raises(RetrievalError, match=other_weights.fingerprint[:16]) as err:
        query(tmp_path / "index", text="record 3", embedder=other_weights)
    assert FakeEmbedder(seed=0).fingerprint[:16] in str(err.value)


def test_query_errors(toy, tmp_path):
    embedder = toy["embedder"]
    with pytest.raises(RetrievalError, match="exactly one of text or image"):
        query(toy["index"], text="a", image=np.zeros((64, 64, 3), np.uint8), embedder=embedder)
    with pytest.raises(RetrievalError, match="exactly one"):
        query(toy["index"], embedder=embedder)
    with pytest.raises(RetrievalError, match=f"no {META}"):
        query(tmp_path, text="zorbo the star", embedder=embedder)
    with pytest.raises(RetrievalError, match="kind: unknown index kind 'annoy'"):
        build_index(toy["root"] / "collection", tmp_path / "x", embedder, kind="annoy")


def test_missing_faiss_is_a_clear_error(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(FaissMissingError) as err:
        build_index(toy["root"] / "collection", tmp_path / "index", toy["embedder"])
    assert "pip install faiss-cpu" in str(err.value) and 'pip install -e ".[retrieval]"' in str(err.value)
    with pytest.raises(FaissMissingError, match="pip install faiss-cpu"):
        RetrievalIndex(toy["index"]).search(text="zorbo the star", embedder=toy["embedder"])
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_build_and_answer(kind, tmp_path):
    source = random_collection(tmp_path, 300)
    embedder = FakeEmbedder(dim=16)
    result = build_index(source, tmp_path / "index", embedder, kind=kind)
    meta = result.meta
    assert meta["kind"] == kind and meta["count"] == 300 and meta["dims"] == {"text": 16, "image": 16}
    assert (meta["params"] == {"nlist": 7, "nprobe": 7} if kind == "ivf"
            else meta["params"]["m"] == 32 and meta["params"]["ef_search"] == 128)
    index = RetrievalIndex(tmp_path / "index", root=tmp_path)
    for i in (0, 17, 123, 299):
        hits = index.search(text=f"record {i}", k=3, embedder=embedder)
        assert hits[0][0]["text"] == f"record {i}" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 3 and index.last_query_seconds["search"] >= 0
        image = Image.open(tmp_path / "images" / f"{i:04d}.png")
        assert index.search(image=image, k=1, embedder=embedder)[0][0]["path"] == \
            str((tmp_path / "images" / f"{i:04d}.png").resolve())
    again = build_index(source, tmp_path / "index-again", embedder, kind=kind)
    assert file_bytes(again.index_dir) == file_bytes(tmp_path / "index")
    with pytest.raises(RetrievalError, match="outside the index root"):  # the collection is not in the index folder
        RetrievalIndex(tmp_path / "index").search(text="record 0", k=1, embedder=embedder)


def test_auto_kind_switches_to_hnsw_for_large_collections(tmp_path):
    source = random_collection(tmp_path, 120)
    result = build_index(source, tmp_path / "index", FakeEmbedder(), kind="auto", flat_below=100,
                         relative_paths=False)
    assert result.meta["kind"] == "hnsw"
    first = json.loads((tmp_path / "index" / RECORDS).read_text().splitlines()[0])
    assert Path(first["path"]).is_absolute()


def test_bad_collection_names_the_file(tmp_path):
    folder = tmp_path / "photos"
    for i in range(3):
        color_png(folder / "a" / f"{i}.png", i).with_suffix(".txt").write_text(f"photo {i}")
    color_png(folder / "b" / "uncaptioned.png", 5)
    (folder / "b" / "broken.png").write_bytes(b"not an image at all")
    (folder / "b" / "broken.txt").write_text("a broken photo")
    with pytest.raises(BadRecordsError) as err:
        build_index(folder, tmp_path / "index", FakeEmbedder())
    message = str(err.value)
    assert "2 bad record(s)" in message
    assert f"{folder / 'b' / 'uncaptioned.png'}: no caption file uncaptioned.txt" in message
    assert f"{folder / 'b' / 'broken.png'}: not an image" in message
    assert not (tmp_path / "index").exists()

    skipped = build_index(folder, tmp_path / "index", FakeEmbedder(), skip_bad=True)
    assert skipped.meta["count"] == 3 and len(skipped.skipped) == 2

    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"file_name": "photos/a/0.png", "text": "ok"}\n{"file_name": "photos/a/1.png"}\nnot json\n'
                     '{"file_name": "photos/missing.png", "text": "gone"}\n')
    with pytest.raises(BadRecordsError) as err:
        build_index(jsonl, tmp_path / "index2", FakeEmbedder())
    message = str(err.value)
    assert f"{jsonl} line 2: 'text' must be a non-empty string" in message
    assert f"{jsonl} line 3: not JSON" in message
    assert f"{tmp_path / 'photos' / 'missing.png'}: file does not exist" in message
    with pytest.raises(DataError, match="collection: .*nowhere does not exist"):
        build_index(tmp_path / "nowhere", tmp_path / "index3", FakeEmbedder())


def test_build_index_script(toy, tmp_path, capsys):
    script = load_script("data_tools/build_index.py")
    subject = toy["subjects"][2]
    code = script.main([str(toy["root"] / "collection"), str(tmp_path / "index"), "--embedder", "toy",
                        "--kind", "hnsw", "--query", subject.query, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "indexed 80 records (hnsw" in out and f"query '{subject.query}':" in out and " ms " in out
    assert str(subject.files[0]) in out or any(str(f) in out for f in subject.files)
    assert json.loads((tmp_path / "index" / META).read_text())["kind"] == "hnsw"

    code = script.main([str(tmp_path / "nowhere"), str(tmp_path / "index2"), "--embedder", "toy", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "error: collection:" in err and "Traceback" not in err


def test_open_clip_embedder_interface(empty_hub_cache, monkeypatch):
    from personalize.metrics import MetricWeightsError, tiny_clip

    embedder = OpenClipEmbedder(tiny_clip(device="cpu"))
    assert embedder.name == "open_clip:ViT-B-32" and len(embedder.fingerprint) == 64
    assert embedder.fingerprint == OpenClipEmbedder(tiny_clip(device="cpu")).fingerprint
    assert embedder.fingerprint != OpenClipEmbedder(tiny_clip(seed=1, device="cpu")).fingerprint
    assert embedder.embed_texts(["a dog", "a cat"]).shape == (2, 32)
    assert embedder.embed_images([np.zeros((40, 30, 3), np.uint8)]).shape == (1, 32)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricWeightsError, match="--clip-weights"):
        OpenClipEmbedder.load()


def test_zero_shot_with_an_index_writes_the_retrieved_pairs(toy, train_run, tmp_path):
    """personalize zero-shot --index: the K pairs nearest to the query become the references, and are
    written next to the output (here with the tiny in-context model: the plumbing, not the pictures)."""
    from personalize.cli import main

    train_run("tiny/incontext", tmp_path, "train.max_steps=1", "train.mixed_precision=no")
    subject = toy["subjects"][3]
    out = tmp_path / "zs"
    assert main(["zero-shot", "--model", str(tmp_path / "run"), "--index", str(toy["index"]), "--index-root",
                 str(toy["collection"]), "--query", subject.query, "--prompt", f"a {subject.cls} in the snow",
                 "-n", "1", "--steps", "2", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "retrieved" / "retrieved.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(subject.name in line["text"] for line in lines)  # the tiny model's K = 2
    assert all((out / "retrieved" / line["file"]).is_file() for line in lines) and (out / "000.png").is_file()
