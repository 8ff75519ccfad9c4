"""Reading a collection (a folder tree with ``NAME.txt`` captions, or a JSONL of ``{"file_name", "text"}``
records) into :class:`Record` s, and embedding it (:func:`embed_collection` -> :class:`Embedded`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from personalize.data.cluster_builder import BadRecord, BadRecordsError, read_caption
from personalize.data.images import IMAGE_EXTENSIONS, DataError, ImageError, load_image
from personalize.data.jsonl import parse_jsonl
from personalize.retrieval.embedders import Embedder, normalize

logger = logging.getLogger(__name__)


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
        text, problem = read_caption(caption_file)
        if problem:
            bad.append(BadRecord(str(caption_file), problem))
            continue
        records.append(Record(path, text))
    if not records and not bad:
        raise DataError(f"collection: no images under {root} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return records, bad


def read_jsonl(jsonl: str | Path) -> tuple[list[Record], list[BadRecord]]:
    """Records ``{"file_name", "text"}`` of a JSONL, ``file_name`` relative to the JSONL; blank lines are
    skipped, other keys ignored. A line that is not such a record is a bad record named by its line."""
    jsonl = Path(jsonl)

    def parse(record: dict, _line: int) -> Record:
        problems = [f"{key!r} must be a non-empty string, got {record.get(key)!r}" for key in ("file_name", "text")
                    if not isinstance(record.get(key), str) or not record[key].strip()]
        if problems:
            raise ValueError("; ".join(problems) + " (need file_name and text)")
        return Record(jsonl.parent / record["file_name"], record["text"].strip())

    records, bad = parse_jsonl(jsonl, parse)
    bad = [BadRecord(f"{jsonl} line {number}", problem) for number, problem in bad]
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


# -- embedding a collection -----------------------------------------------------------------------

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
