"""Retrieval for the in-context model (Re-Imagen mode): a nearest-neighbour index over an image-text
collection, queried by a prompt (text -> captions) or by an image (image -> images).

An **index folder** (written by :func:`build_index`, or ``data_tools/build_index.py``) holds

- ``index_text.faiss`` and ``index_image.faiss``: faiss indexes of the L2-normalized caption and image
  embeddings, searched by inner product (= cosine similarity);
- ``records.jsonl``: one ``{"path", "text"}`` record per row of both indexes, in row order; a path is
  relative to the index folder (or absolute, with ``relative_paths=False``);
- ``index.json``: the embedder's name and a fingerprint of its weights, the embedding dimensions, the
  index kind and its parameters, and the record count.

The kind is ``flat`` (exact search, ``IndexFlatIP``), ``ivf`` (inverted lists over k-means cells,
``IndexIVFFlat``) or ``hnsw`` (a graph, ``IndexHNSWFlat``); ``auto`` is ``flat`` below
:data:`AUTO_FLAT_BELOW` records and ``hnsw`` above. Building twice from the same data gives
byte-identical files: records are sorted by path, faiss's k-means has a fixed seed and faiss builds on
one thread (HNSW insertion on several threads is not guaranteed to be deterministic).

Embeddings come from an :class:`Embedder` (``name``, ``fingerprint``, ``embed_texts``, ``embed_images``):

- :class:`OpenClipEmbedder`: open_clip ViT-B/32 for real photos (the weights that
  ``personalize.metrics.ClipMetric`` loads: a local checkpoint or the Hugging Face cache/hub);
- :class:`ToyEmbedder`: the toy world, where no CLIP weights exist. Captions are embedded with the
  shipped toy model's own text encoder; images with the toy world's identity judge. The toy text
  encoder never saw made-up subject names, and its hidden states bury a name under the scene and class
  words it was trained on: on 1,000 named subjects x 10 captions, name recall@5 is 0.76 with mean-pooled
  hidden states and 0.18 with the pooled output, but 1.00 with the mean of its *input token embeddings*
  over the caption's tokens (precision@5 0.25, 0.04, 0.95). Token embeddings are
  the default (``pooling="tokens"``); ``docs/retrieval.md`` has the measured figures.

faiss is an optional dependency (``pip install faiss-cpu`` or ``pip install -e ".[retrieval]"``),
imported only when an index is built or read. :func:`toy_named_collection` writes a toy-world test
collection: renders of many subjects, each captioned with a made-up name of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from personalize.data.cluster_builder import BadRecord, BadRecordsError
from personalize.data.images import IMAGE_EXTENSIONS, DataError, ImageError, load_image

logger = logging.getLogger(__name__)

TEXT_INDEX, IMAGE_INDEX, RECORDS, META = "index_text.faiss", "index_image.faiss", "records.jsonl", "index.json"
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_FLAT_BELOW = 50_000  # kind "auto": exact search below this many records, HNSW from here on
KMEANS_SEED = 1234  # faiss k-means (IVF training) seed: fixed, so IVF builds are reproducible
# HNSW neighbours per node, build and search breadth; IVF cells searched per query: at least IVF_NPROBE and a
# quarter of the cells. Toy name queries are far from their captions (cosine ~0.6), harder for approximate
# search than near duplicates: on 10,000 toy captions (exact search: precision@5 0.95), HNSW with
# ef_construction 80 / ef_search 64 gave 0.89 and IVF with nprobe 16 of 256 cells 0.51; these defaults 0.93 / 0.86.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 128, 128
IVF_NPROBE, IVF_NPROBE_FRACTION = 16, 4


class RetrievalError(DataError):
    """A problem with an index or a query that is the user's to fix; the message names the file or key."""


class FaissMissingError(RetrievalError, ImportError):
    """faiss, the optional dependency of retrieval, is not installed."""


def import_faiss():
    """The ``faiss`` module, or :class:`FaissMissingError` saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise FaissMissingError(
            f"retrieval indexes need faiss, which is not installed ({err}); install it with "
            "`pip install faiss-cpu` or `pip install -e \".[retrieval]\"`") from None
    return faiss


@contextlib.contextmanager
def _faiss_threads(faiss, threads: Optional[int]) -> Iterator[None]:
    """Run faiss on ``threads`` OpenMP threads (None: leave as is), restoring the count afterwards."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def normalize(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows as contiguous float32 with unit L2 norm (an all-zero row stays zero)."""
    array = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected embeddings shaped (n, d), got {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


# -- embedders ------------------------------------------------------------------------------------

def state_fingerprint(*parts: torch.nn.Module | dict | bytes | str) -> str:
    """A stable sha256 over modules' state dicts (each tensor's name, dtype, shape and bytes, in key order),
    plain dicts of tensors, bytes and strings: it changes when any weight changes."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode("utf-8")
        if isinstance(part, bytes):
            digest.update(b"bytes:" + str(len(part)).encode() + b":" + part)
            continue
        state = part.state_dict() if isinstance(part, torch.nn.Module) else part
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Embedder(ABC):
    """Embeds captions and images into the spaces an index searches. ``name`` says which model and how;
    ``fingerprint`` identifies its weights (a query must use the embedder the index was built with)."""

    name: str = "embedder"

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable string that identifies the weights, e.g. a sha256 over the state dict's tensors."""

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(n, d_text) embeddings of ``n`` texts."""

    @abstractmethod
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """(n, d_image) embeddings of ``n`` PIL images or uint8 (H, W, 3) arrays."""


class OpenClipEmbedder(Embedder):
    """open_clip CLIP (ViT-B/32 by default): text and image embeddings in CLIP's joint space."""

    def __init__(self, metric, model_name: str = "ViT-B-32"):
        """``metric``: a :class:`personalize.metrics.ClipMetric` (its model, preprocess and tokenizer)."""
        self.metric = metric
        self.name = f"open_clip:{model_name}"
        self._fingerprint: Optional[str] = None

    @classmethod
    def load(cls, weights: Optional[str] = None, model_name: str = "ViT-B-32", device=None) -> "OpenClipEmbedder":
        """``weights``: a local open_clip checkpoint or a folder holding one (``--clip-weights``), or None for
        OpenAI's ViT-B/32 from the Hugging Face cache or hub; offline without them a clear
        ``MetricWeightsError`` says what is missing."""
        from personalize.metrics import ClipMetric

        return cls(ClipMetric.load(weights, model_name=model_name, device=device), model_name)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.metric.model)
        return self._fingerprint

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.metric.embed_texts(list(texts))

    def embed_images(self, images: Sequence) -> torch.Tensor:
        return self.metric.embed_images(list(images))


class ToyEmbedder(Embedder):
    """The toy world's embedder: captions through the shipped toy model's text encoder, images through
    the toy world's identity judge (``Judges.load().embed``).

    ``pooling`` turns a caption's tokens (start and end tokens left out) into one vector:
    ``"tokens"`` (default) averages the text encoder's input token embeddings; ``"mean"`` averages its
    last hidden states; ``"pooled"`` is its pooled output (the end token's final hidden state)."""

    POOLINGS = ("tokens", "mean", "pooled")

    def __init__(self, model_path: str | Path | None = None, judges=None, pooling: str = "tokens",
                 batch_size: int = 256):
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        from personalize.toyworld.judge import Judges
        from personalize.toyworld.model import toy_model_path

        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling: unknown {pooling!r}; choose from {', '.join(self.POOLINGS)}")
        self.pooling, self.batch_size = pooling, batch_size
        self.name = f"toy:text-{pooling}+identity"
        self.model_path = Path(model_path) if model_path else toy_model_path()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no progress bar for 68 tensors
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.model_path, subfolder="text_encoder",
                                                              torch_dtype=torch.float32).eval()
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.judges = judges if judges is not None else Judges.load()
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            tokenizer_files = sorted((self.model_path / "tokenizer").iterdir())
            self._fingerprint = state_fingerprint(
                self.pooling, *(f.name.encode() + f.read_bytes() for f in tokenizer_files if f.is_file()),
                self.text_encoder, self.judges.identity)
        return self._fingerprint

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, not one string")
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length",
                                   max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            if self.pooling == "pooled":
                out.append(self.text_encoder(**batch).pooler_output)
                continue
            mask = batch.attention_mask.clone().float()
            mask[:, 0] = 0  # the start token
            mask[torch.arange(len(mask)), batch.attention_mask.sum(1) - 1] = 0  # the end token
            if self.pooling == "tokens":
                hidden = self.text_encoder.get_input_embeddings()(batch.input_ids)
            else:
                hidden = self.text_encoder(**batch).last_hidden_state
            out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
        return torch.cat(out).float() if out else torch.zeros(0, self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        from personalize.metrics import as_pil
        from personalize.toyworld.judge import to_tensor

        # one at a time into 64x64 tensors: a collection's images need not share a size
        pixels = torch.cat([to_tensor(np.array(as_pil(image))) for image in images])
        return self.judges.embed(pixels)


def embedder_for(name: str, clip_weights: Optional[str] = None, device=None) -> Embedder:
    """The embedder an index's ``index.json`` names, built with default weights (``clip_weights`` for CLIP)."""
    if name.startswith("toy:text-") and name.endswith("+identity"):
        return ToyEmbedder(pooling=name[len("toy:text-"):-len("+identity")])
    if name.startswith("open_clip:"):
        return OpenClipEmbedder.load(clip_weights, model_name=name.split(":", 1)[1], device=device)
    raise RetrievalError(f"no built-in embedder is called {name!r}; pass the embedder the index was built with")


# -- collections ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One image-text pair of a collection: the image file and its caption."""

    path: Path
    text: str


def read_folder(root: str | Path, caption_extension: str = ".txt") -> tuple[list[Record], list[BadRecord]]:
    """Every image under ``root`` (any depth; hidden files and folders ignored) with the caption file beside
    it (``NAME.txt``). A missing, empty or unreadable caption file is a bad record."""
    root = Path(root)
    records, bad = [], []
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in images:
        caption_file = path.with_suffix(caption_extension)
        if not caption_file.is_file():
            bad.append(BadRecord(str(path), f"no caption file {caption_file.name} beside it"))
            continue
        try:
            text = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            bad.append(BadRecord(str(caption_file), f"cannot read caption: {err}"))
            continue
        if not text:
            bad.append(BadRecord(str(caption_file), "empty caption file"))
            continue
        records.append(Record(path, text))
    if not records and not bad:
        raise DataError(f"collection: no images under {root} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return records, bad


def read_jsonl(jsonl: str | Path) -> tuple[list[Record], list[BadRecord]]:
    """Records ``{"file_name", "text"}`` of a JSONL, ``file_name`` relative to the JSONL; blank lines are
    skipped, other keys ignored. A line that is not such a record is a bad record named by its line."""
    jsonl = Path(jsonl)
    records, bad = [], []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(BadRecord(where, f"not JSON: {err}"))
            continue
        if not isinstance(record, dict):
            bad.append(BadRecord(where, f"a record is a JSON object, got {type(record).__name__}"))
            continue
        problems = [f"{key!r} must be a non-empty string, got {record.get(key)!r}" for key in ("file_name", "text")
                    if not isinstance(record.get(key), str) or not record[key].strip()]
        if problems:
            bad.append(BadRecord(where, "; ".join(problems) + " (need file_name and text)"))
            continue
        records.append(Record(jsonl.parent / record["file_name"], record["text"].strip()))
    if not records and not bad:
        raise DataError(f"collection: {jsonl} has no records")
    return records, bad


def read_collection(source: str | Path, caption_extension: str = ".txt") -> tuple[list[Record], list[BadRecord]]:
    """The records of a folder tree or a JSONL, sorted by path then text (reruns agree), and the bad ones.
    Images are not opened here."""
    source = Path(source)
    if source.is_dir():
        records, bad = read_folder(source, caption_extension)
    elif source.is_file():
        records, bad = read_jsonl(source)
    else:
        raise DataError(f"collection: {source} does not exist (give a folder of images with NAME.txt captions "
                        "or a JSONL of file_name, text records)")
    return sorted(records, key=lambda r: (str(r.path), r.text)), bad


# -- building -------------------------------------------------------------------------------------

@dataclass
class Embedded:
    """A collection's records with their L2-normalized caption and image embeddings (float32, row aligned)."""

    records: list[Record]
    text: np.ndarray  # (n, d_text)
    image: np.ndarray  # (n, d_image)
    bad: list[BadRecord] = field(default_factory=list)  # skipped (skip_bad) records
    seconds: dict[str, float] = field(default_factory=dict)  # "images", "texts": time spent embedding


def _load_batch(records: Sequence[Record]) -> tuple[list[Record], list[Image.Image], list[BadRecord]]:
    good, images, bad = [], [], []
    for record in records:
        try:
            images.append(load_image(record.path))
        except ImageError as err:
            bad.append(BadRecord(str(record.path), err.reason))
        else:
            good.append(record)
    return good, images, bad


def embed_collection(records: Sequence[Record], embedder: Embedder, bad: Sequence[BadRecord] = (),
                     skip_bad: bool = False, batch_size: int = 256, progress: bool = False,
                     what: str = "collection") -> Embedded:
    """Load every record's image once and embed it and its caption. Unreadable images join ``bad``; bad
    records raise one :class:`BadRecordsError` naming every file (after all images were tried), or are
    left out with ``skip_bad``."""
    bad = list(bad)
    kept: list[Record] = []
    image_vectors: list[torch.Tensor] = []
    start = time.perf_counter()
    for first in tqdm(range(0, len(records), batch_size), desc="embedding images", disable=not progress):
        good, images, failed = _load_batch(records[first:first + batch_size])
        bad += failed
        if good and not (bad and not skip_bad):  # once a record is bad the build fails: only check the rest
            image_vectors.append(embedder.embed_images(images))
        kept += good
    if bad and not skip_bad:
        raise BadRecordsError(bad, what)
    if bad:
        logger.warning("%s: skipped %d bad record(s): %s", what, len(bad), "; ".join(map(str, bad[:5])))
    if not kept:
        raise DataError(f"{what}: no usable records ({len(bad)} bad)")
    image_seconds = time.perf_counter() - start
    start = time.perf_counter()
    texts = [r.text for r in kept]
    text_vectors = [embedder.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return Embedded(kept, normalize(torch.cat(text_vectors)), normalize(torch.cat(image_vectors)), bad,
                    {"images": image_seconds, "texts": time.perf_counter() - start})


def resolve_kind(kind: str, count: int, flat_below: int = AUTO_FLAT_BELOW) -> str:
    """``auto``: ``flat`` (exact) below ``flat_below`` records, else ``hnsw``; other kinds as given."""
    if kind not in KINDS:
        raise RetrievalError(f"kind: unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if count < flat_below else "hnsw"
    return kind


def default_nlist(count: int) -> int:
    """IVF cells: about 4 sqrt(n), with at least 39 training points per cell (faiss's minimum)."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


def make_index(vectors: np.ndarray, kind: str, params: dict[str, int]):
    """A faiss inner-product index of ``kind`` (flat, ivf or hnsw) holding ``vectors``; call inside
    ``_faiss_threads(faiss, 1)`` for reproducible bytes."""
    faiss = import_faiss()
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = KMEANS_SEED
        index.train(vectors)
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        raise RetrievalError(f"kind: unknown index kind {kind!r}; choose from flat, ivf, hnsw")
    index.add(vectors)
    return index


def index_params(kind: str, count: int, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                 m: Optional[int] = None, ef_search: Optional[int] = None) -> dict[str, int]:
    """The parameters of a ``kind`` index over ``count`` records (defaults for those not given)."""
    if kind == "ivf":
        nlist = nlist or default_nlist(count)
        return {"nlist": nlist, "nprobe": min(nlist, nprobe or max(IVF_NPROBE, nlist // IVF_NPROBE_FRACTION))}
    if kind == "hnsw":
        return {"m": m or HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef_search or HNSW_EF_SEARCH}
    return {}


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stored_path(path: Path, index_dir: Path, relative: bool) -> str:
    path = Path(os.path.abspath(path))
    if relative:
        try:
            return Path(os.path.relpath(path, os.path.abspath(index_dir))).as_posix()
        except ValueError:  # another drive (Windows): no relative path
            pass
    return path.as_posix()


@dataclass
class BuildResult:
    """What :func:`write_index` wrote: the folder, its metadata and how long each step took."""

    index_dir: Path
    meta: dict[str, Any]
    seconds: dict[str, float]
    skipped: list[BadRecord] = field(default_factory=list)

    def summary(self) -> str:
        times = ", ".join(f"{step} {s:.1f} s" for step, s in self.seconds.items())
        skipped = f", skipped {len(self.skipped)} bad record(s)" if self.skipped else ""
        return (f"indexed {self.meta['count']} records ({self.meta['kind']}, text dim {self.meta['dims']['text']}, "
                f"image dim {self.meta['dims']['image']}) with {self.meta['embedder']['name']} into "
                f"{self.index_dir}{skipped}; {times}")


def write_index(index_dir: str | Path, embedded: Embedded, embedder: Embedder, kind: str = "auto",
                relative_paths: bool = True, flat_below: int = AUTO_FLAT_BELOW, threads: Optional[int] = 1,
                **params: Optional[int]) -> BuildResult:
    """Write the index folder for embedded records: both faiss indexes, ``records.jsonl`` and ``index.json``.
    ``params``: ``nlist``/``nprobe`` (ivf), ``m``/``ef_search`` (hnsw). ``threads=1`` (default) makes the
    files reproducible; None lets faiss use every core."""
    faiss = import_faiss()
    index_dir = Path(index_dir)
    count = len(embedded.records)
    kind = resolve_kind(kind, count, flat_below)
    chosen = index_params(kind, count, **params)
    start = time.perf_counter()
    with _faiss_threads(faiss, threads):
        indexes = {name: make_index(vectors, kind, chosen)
                   for name, vectors in ((TEXT_INDEX, embedded.text), (IMAGE_INDEX, embedded.image))}
    index_seconds = time.perf_counter() - start
    index_dir.mkdir(parents=True, exist_ok=True)
    for name, index in indexes.items():
        _write_bytes(index_dir / name, faiss.serialize_index(index).tobytes())
    lines = [json.dumps({"path": _stored_path(r.path, index_dir, relative_paths), "text": r.text},
                        ensure_ascii=False) for r in embedded.records]
    _write_bytes(index_dir / RECORDS, ("\n".join(lines) + "\n").encode("utf-8"))
    meta = {"format": FORMAT_VERSION, "embedder": {"name": embedder.name, "fingerprint": embedder.fingerprint},
            "dims": {"text": int(embedded.text.shape[1]), "image": int(embedded.image.shape[1])},
            "kind": kind, "params": chosen, "count": count, "metric": "inner product of L2-normalized vectors",
            "files": {"text": TEXT_INDEX, "image": IMAGE_INDEX, "records": RECORDS}}
    _write_bytes(index_dir / META, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return BuildResult(index_dir, meta, {**{f"embed {k}": v for k, v in embedded.seconds.items()},
                                         "index": index_seconds}, embedded.bad)


def build_index(source: str | Path, index_dir: str | Path, embedder: Embedder, kind: str = "auto",
                caption_extension: str = ".txt", skip_bad: bool = False, relative_paths: bool = True,
                batch_size: int = 256, flat_below: int = AUTO_FLAT_BELOW, threads: Optional[int] = 1,
                progress: bool = False, **params: Optional[int]) -> BuildResult:
    """Embed the collection ``source`` (a folder tree with ``NAME.txt`` captions beside the images, or a
    JSONL of ``{"file_name", "text"}`` records relative to it) and write an index folder ``index_dir``."""
    import_faiss()  # fail before embedding anything
    records, bad = read_collection(source, caption_extension)
    embedded = embed_collection(records, embedder, bad, skip_bad=skip_bad, batch_size=batch_size,
                                progress=progress, what=f"collection {source}")
    return write_index(index_dir, embedded, embedder, kind, relative_paths, flat_below, threads, **params)


# -- querying -------------------------------------------------------------------------------------

def _check_embedder(index_dir: Path, meta: dict, embedder: Embedder) -> None:
    built = meta["embedder"]
    if embedder.name != built["name"] or embedder.fingerprint != built["fingerprint"]:
        raise RetrievalError(
            f"{index_dir / META}: the index was built with embedder {built['name']!r} (weights "
            f"{built['fingerprint'][:16]}...) but the query uses {embedder.name!r} (weights "
            f"{embedder.fingerprint[:16]}...); query with the embedder the index was built with, or rebuild it")


class RetrievalIndex:
    """An index folder loaded for querying. ``last_query_seconds`` holds the time of the latest query
    (``embed``: the query's embedding, ``search``: the faiss search)."""

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        meta_file = self.index_dir / META
        if not meta_file.is_file():
            raise RetrievalError(f"{self.index_dir}: not an index folder (no {META}; build one with "
                                 "data_tools/build_index.py)")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
            missing = [k for k in ("embedder", "dims", "kind", "count") if k not in self.meta]
        except json.JSONDecodeError as err:
            raise RetrievalError(f"{meta_file}: not JSON: {err}") from None
        if missing:
            raise RetrievalError(f"{meta_file}: missing key(s) {', '.join(missing)}")
        records_file = self.index_dir / RECORDS
        if not records_file.is_file():
            raise RetrievalError(f"{records_file}: missing (the index folder is incomplete; rebuild it)")
        self.records = [json.loads(line) for line in records_file.read_text(encoding="utf-8").splitlines() if line]
        if len(self.records) != self.meta["count"]:
            raise RetrievalError(f"{records_file}: {len(self.records)} records but {META} says {self.meta['count']}")
        self._indexes: dict[str, Any] = {}
        self.last_query_seconds: dict[str, float] = {}

    def _index(self, name: str):
        if name not in self._indexes:
            faiss = import_faiss()
            path = self.index_dir / name
            if not path.is_file():
                raise RetrievalError(f"{path}: missing (the index folder is incomplete; rebuild it)")
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
            if index.ntotal != self.meta["count"]:
                raise RetrievalError(f"{path}: holds {index.ntotal} vectors but {META} says {self.meta['count']}")
            params = self.meta.get("params", {})
            if "nprobe" in params:
                index.nprobe = params["nprobe"]
            if "ef_search" in params:
                index.hnsw.efSearch = params["ef_search"]
            self._indexes[name] = index
        return self._indexes[name]

    def record(self, row: int) -> dict[str, Any]:
        """Record ``row`` with its ``path`` made absolute (stored paths are relative to the index folder)."""
        record = dict(self.records[row])
        path = Path(record["path"])
        record["path"] = str(path if path.is_absolute() else (self.index_dir / path).resolve())
        record["row"] = row
        return record

    def search(self, text: Optional[str] = None, image=None, k: int = 5,
               embedder: Optional[Embedder] = None) -> list[tuple[dict[str, Any], float]]:
        """The ``k`` records nearest to ``text`` (by caption) or ``image`` (by image: a path, a PIL image or
        uint8 pixels), best first, with their cosine similarity."""
        if (text is None) == (image is None):
            raise RetrievalError("query: give exactly one of text or image")
        if k < 1:
            raise RetrievalError(f"query: k must be at least 1, got {k}")
        embedder = embedder or _default_embedder(self.meta["embedder"]["name"])
        _check_embedder(self.index_dir, self.meta, embedder)
        start = time.perf_counter()
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise RetrievalError(f"query: text must be a non-empty string, got {text!r}")
            vector, index = normalize(embedder.embed_texts([text])), self._index(TEXT_INDEX)
        else:
            if isinstance(image, (str, Path)):
                image = load_image(image)  # ImageError names the file
            vector, index = normalize(embedder.embed_images([image])), self._index(IMAGE_INDEX)
        embedded = time.perf_counter()
        scores, rows = index.search(vector, min(k, self.meta["count"]))
        self.last_query_seconds = {"embed": embedded - start, "search": time.perf_counter() - embedded}
        logger.info("query of %s took %.1f ms (search %.2f ms)", self.index_dir,
                    1000 * (time.perf_counter() - start), 1000 * self.last_query_seconds["search"])
        return [(self.record(int(row)), float(score)) for row, score in zip(rows[0], scores[0]) if row >= 0]


_EMBEDDERS: dict[str, Embedder] = {}
_INDEXES: dict[tuple[str, int], RetrievalIndex] = {}


def _default_embedder(name: str) -> Embedder:
    """The built-in embedder called ``name`` with its default weights, built once per process."""
    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = embedder_for(name)
    return _EMBEDDERS[name]


def load_index(index_dir: str | Path) -> RetrievalIndex:
    """The index folder ``index_dir``, loaded once per process (again when its ``index.json`` changes)."""
    index_dir = Path(index_dir)
    meta_file = index_dir / META
    key = (str(index_dir.resolve()), meta_file.stat().st_mtime_ns if meta_file.is_file() else -1)
    if key not in _INDEXES:
        _INDEXES[key] = RetrievalIndex(index_dir)
    return _INDEXES[key]


def query(index_dir: str | Path, text: Optional[str] = None, image=None, k: int = 5,
          embedder: Optional[Embedder] = None) -> list[tuple[dict[str, Any], float]]:
    """The ``k`` records of the index at ``index_dir`` nearest to a prompt ``text`` (text -> captions) or
    a query ``image`` (image -> images), best first, as ``(record, cosine)``; a record has ``path``
    (absolute), ``text`` and ``row``. ``embedder``: default, the built-in one the index names; one whose
    name or weights differ from the index's is an error. The time taken is in
    ``load_index(index_dir).last_query_seconds``."""
    return load_index(index_dir).search(text=text, image=image, k=k, embedder=embedder)


# -- a toy-world test collection -------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kl", "pl",
           "sn", "tr", "qu", "j", "w", "sk", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai", "ou")
_CODAS = ("n", "x", "m", "k", "l", "r", "b", "sh", "p")
_TEMPLATES = ("a photo of {name} the {cls}", "{name} the {cls}", "a picture of {name} the {cls}",
              "a close-up photo of {name} the {cls}")


def toy_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up pronounceable names ("zorbo"-like: two or three syllables), the same for
    the same seed; name ``i`` does not depend on ``n``. None is a held-out subject's name or a toy-world
    word."""
    from personalize.toyworld.world import ACCESSORIES, CLASSES, COLORS, HELDOUT_NAMES, SCENES

    taken = set(HELDOUT_NAMES) | set(CLASSES) | set(COLORS)
    taken |= {w for words in (*SCENES.values(), *ACCESSORIES.values()) for w in words.split()}
    names: list[str] = []
    for i in range(n):
        for attempt in range(1000):
            rng = np.random.default_rng([31, seed, i, attempt])
            syllables = 2 if rng.random() < 0.75 else 3
            name = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS))
                           + (str(rng.choice(_CODAS)) if rng.random() < 0.3 else "") for _ in range(syllables))
            if name not in taken and len(name) <= 10:
                break
        else:  # pragma: no cover - 1000 collisions in a row would need far more names than syllables allow
            raise RuntimeError(f"could not find a new name for subject {i}")
        taken.add(name)
        names.append(name)
    return names


@dataclass(frozen=True)
class ToyNamedSubject:
    """One subject of a toy named collection: its name, training-subject number, class and files."""

    name: str
    subject: int
    cls: str
    files: tuple[Path, ...]

    @property
    def query(self) -> str:
        """The name query that should retrieve this subject's renders: "zorbo the star"."""
        return f"{self.name} the {self.cls}"


def toy_caption(name: str, spec, template: str = _TEMPLATES[0]) -> str:
    """A named caption of a toy-world spec: "a photo of zorbo the star wearing a santa hat on the beach"."""
    from personalize.toyworld.world import ACCESSORIES, SCENES

    words = [template.format(name=name, cls=spec.cls)]
    if spec.accessory:
        words.append(f"wearing {ACCESSORIES[spec.accessory]}")
    if spec.scene:
        words.append(SCENES[spec.scene])
    return " ".join(words)


def toy_named_collection(folder: str | Path, n_subjects: int, per_subject: int, seed: int = 0,
                         first_subject: int = 0, progress: bool = False) -> list[ToyNamedSubject]:
    """Write ``per_subject`` renders of training subjects ``first_subject ..`` ``+ n_subjects - 1`` to
    ``folder/<name>/<NN>.png``, each with its caption ``<NN>.txt`` naming the subject by a made-up name of
    its own (:func:`toy_names`) in a random scene, accessory, size and position. The same arguments write
    the same files."""
    from personalize.toyworld.world import render, sample_spec, training_subject

    folder = Path(folder)
    subjects = []
    names = toy_names(n_subjects, seed)
    for i, name in enumerate(tqdm(names, desc="rendering toy collection", disable=not progress)):
        number = first_subject + i
        subject = training_subject(number)
        rng = np.random.default_rng([32, seed, number])
        (folder / name).mkdir(parents=True, exist_ok=True)
        files = []
        for r in range(per_subject):
            spec = sample_spec(rng, subject, p_accessory=0.3, p_no_scene=0.1)
            template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
            path = folder / name / f"{r:02d}.png"
            Image.fromarray(render(spec)).save(path)
            path.with_suffix(".txt").write_text(toy_caption(name, spec, template) + "\n", encoding="utf-8")
            files.append(path)
        subjects.append(ToyNamedSubject(name, number, subject.cls, tuple(files)))
    return subjects
