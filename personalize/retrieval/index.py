"""The faiss index folder: index kinds and their parameters, building and writing it
(:func:`build_index`, :func:`write_index`), and loading and querying it (:class:`RetrievalIndex`,
:func:`load_index`, :func:`query`).

An index folder is read as untrusted input: ``index.json`` must be a UTF-8 JSON object with the keys and
types :func:`write_index` writes, every line of ``records.jsonl`` a ``{"path", "text"}`` object, each
faiss file an index of the kind, dimension, metric and size ``index.json`` names. A record's path must
lead (links followed) to a regular image-sized file inside the index's *root*: the index folder itself,
or a folder the user names (``root``; ``personalize zero-shot --index-root``), so an index cannot make a
command read ``/etc/passwd``, ``../../...`` or ``/dev/zero``. Anything else is a :class:`RetrievalError`
naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from personalize.data.cluster_builder import BadRecord
from personalize.retrieval.embedders import Embedder, embedder_for, normalize
from personalize.retrieval.errors import RetrievalError, import_faiss
from personalize.retrieval.folder import (
    FORMAT_VERSION, IMAGE_INDEX, META, RECORDS, TEXT_INDEX, check_index_folder, is_count, read_meta,
    read_records, refuse_inputs_among_outputs)
from personalize.retrieval.records import Embedded, embed_collection, read_collection, read_image_file, resolve_inside
from personalize.utils.files import atomic_write_bytes
from personalize.utils.output_dir import OutputFolder

logger = logging.getLogger(__name__)

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
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("m", m), ("ef_search", ef_search)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RetrievalError(f"{name}: must be a whole number of at least 1, got {value!r}")
    if kind == "ivf":
        if nlist is not None and nlist > count:
            raise RetrievalError(f"nlist: {nlist} cells for {count} records; give at most {count} (default: "
                                 f"{default_nlist(count)})")
        nlist = nlist or default_nlist(count)
        return {"nlist": nlist, "nprobe": min(nlist, nprobe or max(IVF_NPROBE, nlist // IVF_NPROBE_FRACTION))}
    if kind == "hnsw":
        return {"m": m or HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": ef_search or HNSW_EF_SEARCH}
    return {}


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
                overwrite: bool = True, **params: Optional[int]) -> BuildResult:
    """Write the index folder for embedded records: both faiss indexes, ``records.jsonl`` and ``index.json``
    (last, each file atomically). ``params``: ``nlist``/``nprobe`` (ivf), ``m``/``ef_search`` (hnsw).
    ``threads=1`` (default) makes the files reproducible; None lets faiss use every core. An index already
    in ``index_dir`` is replaced only with ``overwrite`` (:func:`check_index_folder`)."""
    faiss = import_faiss()
    folder = OutputFolder(check_index_folder(index_dir, overwrite), "index_dir").check()  # writable
    index_dir = folder.path
    count = len(embedded.records)
    kind = resolve_kind(kind, count, flat_below)
    chosen = index_params(kind, count, **params)
    start = time.perf_counter()
    with _faiss_threads(faiss, threads):
        indexes = {name: make_index(vectors, kind, chosen)
                   for name, vectors in ((TEXT_INDEX, embedded.text), (IMAGE_INDEX, embedded.image))}
    index_seconds = time.perf_counter() - start
    lines = [json.dumps({"path": _stored_path(r.path, index_dir, relative_paths), "text": r.text},
                        ensure_ascii=False) for r in embedded.records]
    root = os.path.commonpath([os.path.abspath(r.path.parent) for r in embedded.records])
    meta = {"format": FORMAT_VERSION, "embedder": {"name": embedder.name, "fingerprint": embedder.fingerprint},
            "dims": {"text": int(embedded.text.shape[1]), "image": int(embedded.image.shape[1])},
            "kind": kind, "params": chosen, "count": count, "metric": "inner product of L2-normalized vectors",
            "files": {"text": TEXT_INDEX, "image": IMAGE_INDEX, "records": RECORDS},
            "root": _stored_path(Path(root), index_dir, relative_paths)}
    with folder.lock():  # a second build into the folder fails at once, naming this one
        check_index_folder(index_dir, overwrite)
        for name, index in indexes.items():
            atomic_write_bytes(index_dir / name, faiss.serialize_index(index).tobytes())
        atomic_write_bytes(index_dir / RECORDS, ("\n".join(lines) + "\n").encode("utf-8"))
        atomic_write_bytes(index_dir / META, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return BuildResult(index_dir, meta, {**{f"embed {k}": v for k, v in embedded.seconds.items()},
                                         "index": index_seconds}, embedded.bad)


def build_index(source: str | Path, index_dir: str | Path, embedder: Embedder, kind: str = "auto",
                caption_extension: str = ".txt", skip_bad: bool = False, relative_paths: bool = True,
                batch_size: int = 256, flat_below: int = AUTO_FLAT_BELOW, threads: Optional[int] = 1,
                progress: bool = False, overwrite: bool = True, **params: Optional[int]) -> BuildResult:
    """Embed the collection ``source`` (a folder tree with ``NAME.txt`` captions beside the images, or a
    JSONL of ``{"file_name", "text"}`` records relative to it) and write an index folder ``index_dir``.
    Everything is checked before anything is embedded or written: the options, the output folder
    (:func:`check_index_folder`), and that no input is one of the files the build writes."""
    import_faiss()  # fail before embedding anything
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RetrievalError(f"batch_size: must be a whole number of at least 1, got {batch_size!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise RetrievalError(f"threads: must be a whole number of at least 1, got {threads!r}")
    resolve_kind(kind, 0, flat_below)
    index_params("flat", 1, **params)  # the parameters' types and values
    OutputFolder(check_index_folder(index_dir, overwrite), "index_dir").check()
    records, bad = read_collection(source, caption_extension)
    refuse_inputs_among_outputs(Path(index_dir), Path(source), records, caption_extension)
    embedded = embed_collection(records, embedder, bad, skip_bad=skip_bad, batch_size=batch_size,
                                progress=progress, what=f"collection {source}")
    return write_index(index_dir, embedded, embedder, kind, relative_paths, flat_below, threads, overwrite,
                       **params)


# -- querying -------------------------------------------------------------------------------------

_FAISS_CLASSES = {"flat": "IndexFlat", "ivf": "IndexIVF", "hnsw": "IndexHNSW"}  # index.json kind -> faiss class


def _check_embedder(index_dir: Path, meta: dict, embedder: Embedder) -> None:
    built = meta["embedder"]
    if embedder.name != built["name"] or embedder.fingerprint != built["fingerprint"]:
        raise RetrievalError(
            f"{index_dir / META}: the index was built with embedder {built['name']!r} (weights "
            f"{built['fingerprint'][:16]}...) but the query uses {embedder.name!r} (weights "
            f"{embedder.fingerprint[:16]}...); query with the embedder the index was built with, or rebuild it")


def _faiss_reason(err: BaseException) -> str:
    """faiss's C++ message without its source location (``Error in ... at file.cpp:12: ``)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)[:200]


class RetrievalIndex:
    """An index folder loaded for querying (checked as the module docstring says). ``root``: the folder
    every record's file must lie in (default: the index folder). ``last_query_seconds`` holds the time of
    the latest query (``embed``: the query's embedding, ``search``: the faiss search)."""

    def __init__(self, index_dir: str | Path, root: str | Path | None = None):
        self.index_dir = Path(index_dir)
        self.root = Path(root).expanduser() if root is not None else self.index_dir
        if root is not None and not self.root.is_dir():
            raise RetrievalError(f"index root: {root} is not a folder")
        meta_file = self.index_dir / META
        if not meta_file.is_file():
            raise RetrievalError(f"{self.index_dir}: not an index folder (no {META}; build one with "
                                 "data_tools/build_index.py)")
        self.meta = read_meta(meta_file)
        records_file = self.index_dir / RECORDS
        if not records_file.is_file():
            raise RetrievalError(f"{records_file}: missing (the index folder is incomplete; rebuild it)")
        self.records, self._lines = read_records(records_file, self.meta["count"])
        self._indexes: dict[str, Any] = {}
        self.last_query_seconds: dict[str, float] = {}

    def _index(self, name: str):
        if name not in self._indexes:
            faiss = import_faiss()
            path = self.index_dir / name
            if not path.is_file():
                raise RetrievalError(f"{path}: missing (the index folder is incomplete; rebuild it)")
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as err:
                raise RetrievalError(f"{path}: cannot read: {err.strerror or err}") from None
            if not data.size:
                raise RetrievalError(f"{path}: empty file, not a faiss index; rebuild the index")
            try:
                index = faiss.deserialize_index(data)
            except (RuntimeError, ValueError, MemoryError) as err:
                raise RetrievalError(f"{path}: not a faiss index, or a truncated or damaged one "
                                     f"({_faiss_reason(err)}); rebuild the index") from None
            kind, dim = self.meta["kind"], self.meta["dims"]["text" if name == TEXT_INDEX else "image"]
            if not isinstance(index, getattr(faiss, _FAISS_CLASSES[kind])):
                raise RetrievalError(f"{path}: holds a {type(index).__name__} but {META} says kind {kind!r}")
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise RetrievalError(f"{path}: not an inner-product index (metric {index.metric_type})")
            if index.d != dim:
                raise RetrievalError(f"{path}: holds {index.d}-dimensional vectors but {META} says {dim}")
            if index.ntotal != self.meta["count"]:
                raise RetrievalError(f"{path}: holds {index.ntotal} vectors but {META} says {self.meta['count']}")
            params = self.meta["params"]
            if kind == "ivf" and "nprobe" in params:
                index.nprobe = params["nprobe"]
            if kind == "hnsw" and "ef_search" in params:
                index.hnsw.efSearch = params["ef_search"]
            self._indexes[name] = index
        return self._indexes[name]

    def _root_hint(self) -> str:
        if self.root != self.index_dir:
            return ""
        declared = self.meta.get("root")
        said = ""
        if isinstance(declared, str) and declared:
            said = f"; its {META} says its images are in {os.path.normpath(self.index_dir / declared)}"
        return (f" (by default the index folder{said}). If you trust this index, name the folder its images are "
                "in as the index root (personalize zero-shot --index-root DIR)")

    def record(self, row: int) -> dict[str, Any]:
        """Record ``row`` (with its ``row`` and its ``line`` in ``records.jsonl``), its ``path`` resolved (stored
        paths are relative to the index folder): the real path of a regular file of at most
        ``MAX_IMAGE_BYTES`` inside the root, else :class:`RetrievalError` naming the record's line."""
        record = dict(self.records[row])
        where = f"{self.index_dir / RECORDS} line {self._lines[row]}"
        record["path"] = str(resolve_inside(record["path"], self.index_dir, self.root, where, self._root_hint()))
        record["row"], record["line"] = row, self._lines[row]
        return record

    def search(self, text: Optional[str] = None, image=None, k: int = 5,
               embedder: Optional[Embedder] = None) -> list[tuple[dict[str, Any], float]]:
        """The ``k`` records nearest to ``text`` (by caption) or ``image`` (by image: a path, a PIL image or
        uint8 pixels), best first, with their cosine similarity; every record's file checked by
        :meth:`record`."""
        if (text is None) == (image is None):
            raise RetrievalError("query: give exactly one of text or image")
        if not is_count(k):
            raise RetrievalError(f"query: k must be a whole number of at least 1, got {k!r}")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise RetrievalError(f"query: text must be a non-empty string, got {text!r}")
        embedder = embedder or _default_embedder(self.meta["embedder"]["name"])
        _check_embedder(self.index_dir, self.meta, embedder)
        start = time.perf_counter()
        if text is not None:
            name = TEXT_INDEX
            vector = normalize(embedder.embed_texts([text]))
        else:
            name = IMAGE_INDEX
            if isinstance(image, (str, Path)):
                image = read_image_file(image).image  # ImageError names the file
            vector = normalize(embedder.embed_images([image]))
        index = self._index(name)
        if vector.ndim != 2 or vector.shape[1] != index.d:
            raise RetrievalError(f"query: the embedder {embedder.name!r} gives {vector.shape[-1]}-dimensional "
                                 f"vectors but {self.index_dir / name} holds {index.d}-dimensional ones")
        embedded = time.perf_counter()
        scores, rows = index.search(vector, min(k, self.meta["count"]))
        self.last_query_seconds = {"embed": embedded - start, "search": time.perf_counter() - embedded}
        logger.info("query of %s took %.1f ms (search %.2f ms)", self.index_dir,
                    1000 * (time.perf_counter() - start), 1000 * self.last_query_seconds["search"])
        return [(self.record(int(row)), float(score)) for row, score in zip(rows[0], scores[0]) if row >= 0]


_EMBEDDERS: dict[str, Embedder] = {}
_INDEXES: dict[tuple[str, tuple[int, int], str], RetrievalIndex] = {}


def _default_embedder(name: str) -> Embedder:
    """The built-in embedder called ``name`` with its default weights, built once per process."""
    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = embedder_for(name)
    return _EMBEDDERS[name]


def load_index(index_dir: str | Path, root: str | Path | None = None) -> RetrievalIndex:
    """The index folder ``index_dir`` with its records' root (default: the index folder), loaded once per
    process (again when its ``index.json`` or ``records.jsonl`` changes)."""
    index_dir = Path(index_dir)
    stamps = tuple((index_dir / name).stat().st_mtime_ns if (index_dir / name).is_file() else -1
                   for name in (META, RECORDS))
    key = (str(index_dir.resolve()), stamps, str(Path(root).expanduser().resolve()) if root is not None else "")
    if key not in _INDEXES:
        _INDEXES[key] = RetrievalIndex(index_dir, root)
    return _INDEXES[key]


def query(index_dir: str | Path, text: Optional[str] = None, image=None, k: int = 5,
          embedder: Optional[Embedder] = None, root: str | Path | None = None) -> list[tuple[dict[str, Any], float]]:
    """The ``k`` records of the index at ``index_dir`` nearest to a prompt ``text`` (text -> captions) or
    a query ``image`` (image -> images), best first, as ``(record, cosine)``; a record has ``path`` (the
    real path of its file, which lies inside ``root``: default the index folder), ``text`` and ``row``.
    ``embedder``: default, the built-in one the index names; one whose name or weights differ from the
    index's is an error. The time taken is in ``load_index(index_dir, root).last_query_seconds``."""
    return load_index(index_dir, root).search(text=text, image=image, k=k, embedder=embedder)

