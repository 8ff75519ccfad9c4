"""Retrieval for the in-context model (Re-Imagen mode): a nearest-neighbour index over an image-text
collection, queried by a prompt (text -> captions) or by an image (image -> images).

An **index folder** (written by :func:`build_index`, or ``data_tools/build_index.py``) holds

- ``index_text.faiss`` and ``index_image.faiss``: faiss indexes of the L2-normalized caption and image
  embeddings, searched by inner product (= cosine similarity);
- ``records.jsonl``: one ``{"path", "text"}`` record per row of both indexes, in row order; a path is
  relative to the index folder (or absolute, with ``relative_paths=False``);
- ``index.json``: the embedder's name and a fingerprint of its weights, the embedding dimensions, the
  index kind and its parameters, the record count, and ``root``: the folder that holds every image.

Reading an index trusts none of it: every file is checked, and a record's path must lead to a regular
image file of at most 64 MiB inside the index's root: the index folder itself unless the user names
another (``root=``, ``personalize zero-shot --index-root``), so an index cannot make a command read
``/etc/passwd``, ``../../...`` or ``/dev/zero``. An index built over a collection outside its folder
(the usual layout) is queried with the collection folder as its root.

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

The package:

- ``embedders``: :class:`Embedder`, :class:`OpenClipEmbedder`, :class:`ToyEmbedder`, :func:`embedder_for`,
  :func:`state_fingerprint` and :func:`normalize`;
- ``records``: reading a collection (:class:`Record`, :func:`read_folder`, :func:`read_jsonl`,
  :func:`read_collection`) and embedding it (:func:`embed_collection` -> :class:`Embedded`); reading an
  image file within bounds (:func:`read_image_file` -> :class:`ImageFile`) and a record's path inside a
  root (:func:`resolve_inside`);
- ``folder``: the index folder's files (:data:`FILES`), whether a folder may receive an index
  (:func:`check_index_folder`) and reading ``index.json`` / ``records.jsonl`` as untrusted input
  (:func:`read_meta`, :func:`read_records`);
- ``index``: the index kinds (:func:`resolve_kind`, :func:`index_params`, :func:`make_index`), building an
  index (:func:`build_index`, :func:`write_index` -> :class:`BuildResult`), loading and querying it
  (:class:`RetrievalIndex`, :func:`load_index`, :func:`query`);
- ``toy``: the toy-world named collection (:func:`toy_names`, :func:`toy_caption`,
  :func:`toy_named_collection` -> :class:`ToyNamedSubject`);
- ``errors``: :class:`RetrievalError`, :class:`FaissMissingError` and :func:`import_faiss`.

Every public name of the parts is importable from ``personalize.retrieval``. A test that replaces a
function must patch it in the part that calls it (e.g. ``personalize.retrieval.index.import_faiss``).
"""

from __future__ import annotations

from personalize.retrieval.embedders import (
    Embedder, OpenClipEmbedder, ToyEmbedder, embedder_for, normalize, state_fingerprint)
from personalize.retrieval.errors import FaissMissingError, RetrievalError, import_faiss
from personalize.retrieval.folder import (
    FILES, FORMAT_VERSION, IMAGE_INDEX, META, RECORDS, TEXT_INDEX, check_index_folder, read_meta, read_records)
from personalize.retrieval.index import (
    AUTO_FLAT_BELOW, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE, IVF_NPROBE_FRACTION, KINDS,
    KMEANS_SEED, BuildResult, RetrievalIndex, build_index, default_nlist, index_params, load_index, make_index,
    query, resolve_kind, write_index)
from personalize.retrieval.records import (
    MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, Embedded, ImageFile, Record, embed_collection, read_collection, read_folder,
    read_image_file, read_jsonl, resolve_inside)
from personalize.retrieval.toy import ToyNamedSubject, toy_caption, toy_named_collection, toy_names

__all__ = [
    # embedders
    "Embedder", "OpenClipEmbedder", "ToyEmbedder", "embedder_for", "normalize", "state_fingerprint",
    # errors
    "FaissMissingError", "RetrievalError", "import_faiss",
    # folder
    "FILES", "FORMAT_VERSION", "IMAGE_INDEX", "META", "RECORDS", "TEXT_INDEX", "check_index_folder", "read_meta",
    "read_records",
    # index
    "AUTO_FLAT_BELOW", "HNSW_EF_CONSTRUCTION", "HNSW_EF_SEARCH", "HNSW_M", "IVF_NPROBE", "IVF_NPROBE_FRACTION",
    "KINDS", "KMEANS_SEED", "BuildResult", "RetrievalIndex", "build_index", "default_nlist", "index_params",
    "load_index", "make_index", "query", "resolve_kind", "write_index",
    # records
    "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "Embedded", "ImageFile", "Record", "embed_collection", "read_collection",
    "read_folder", "read_image_file", "read_jsonl", "resolve_inside",
    # toy
    "ToyNamedSubject", "toy_caption", "toy_named_collection", "toy_names",
]
