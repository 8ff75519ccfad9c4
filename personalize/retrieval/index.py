"""The faiss index folder: index kinds and their parameters, building and writing it
(:func:`build_index`, :func:`write_index`), and loading and querying it (:class:`RetrievalIndex`,
:func:`load_index`, :func:`query`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from personalize.data.cluster_builder import BadRecord
from personalize.data.images import load_image
from personalize.retrieval.embedders import Embedder, embedder_for, normalize
from personalize.retrieval.errors import RetrievalError, import_faiss
from personalize.retrieval.records import Embedded, embed_collection, read_collection

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


# -- building -------------------------------------------------------------------------------------

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

