"""Reading a collection (a folder tree with ``NAME.txt`` captions, or a JSONL of ``{"file_name", "text"}``
records) into :class:`Record` s, and embedding it (:func:`embed_collection` -> :class:`Embedded`); reading
an image file of a collection or an index within bounds (:func:`read_image_file`), and resolving an
index record's path inside the index's root (:func:`resolve_inside`).

An image file is read only if it is a regular file (not a device such as ``/dev/zero``, a fifo or a
folder) of at most :data:`MAX_IMAGE_BYTES` that decodes to at most :data:`MAX_IMAGE_PIXELS` pixels;
the bytes are read once, and the image is decoded from them, so what was checked is what is used.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from personalize.data.cluster_builder import BadRecord, BadRecordsError, read_caption
from personalize.data.images import IMAGE_EXTENSIONS, DataError, ImageError, to_rgb
from personalize.data.jsonl import parse_jsonl
from personalize.retrieval.embedders import Embedder, normalize
from personalize.retrieval.errors import RetrievalError

MAX_IMAGE_BYTES = 64 * 2**20  # an image file of a collection or an index: at most 64 MiB ...
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # ... decoding to at most PIL's decompression-bomb
#                                                          limit of pixels (a hard limit here, not a warning)
_FORMAT_SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFile:
    """An image file read within bounds: its bytes, the RGB image they decode to, and the format."""

    path: Path
    data: bytes
    image: Image.Image
    format: str

    @property
    def suffix(self) -> str:
        """The file suffix of its format (``.png``, ``.jpg``, ...), whatever the file was called."""
        return _FORMAT_SUFFIXES.get(self.format, f".{self.format.lower()}")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_image_file(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                    follow_links: bool = True) -> ImageFile:
    """Read the image file ``path`` within bounds (see the module docstring) and decode it fully (EXIF
    orientation applied, 8-bit RGB, as :func:`personalize.data.images.load_image`). Raises
    :class:`ImageError` (``.path``, ``.reason``) for anything else; never blocks on a fifo or reads a
    device. ``follow_links=False``: a path whose last part is a symbolic link is refused."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(path, "file does not exist") from None
    except OSError as err:
        if path.is_symlink() and not follow_links:
            raise ImageError(path, "a symbolic link") from None
        raise ImageError(path, f"cannot read: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(path, f"{_file_kind(info.st_mode)}, not an image file")
        if info.st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        if info.st_size > max_bytes:
            raise ImageError(path, f"too large: {info.st_size} bytes (at most {max_bytes})")
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise ImageError(path, f"cannot read: {err.strerror or err}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise ImageError(path, f"too large: more than {max_bytes} bytes")
    image, image_format = _decode(data, path, max_pixels)
    return ImageFile(path, data, image, image_format)


def _decode(data: bytes, path: Path, max_pixels: int) -> tuple[Image.Image, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageError(path, f"too large: {width}x{height} pixels (at most {max_pixels})")
                image_format = opened.format or "PNG"
                opened.load()  # decode now: truncated or corrupt data fails here
                return to_rgb(ImageOps.exif_transpose(opened)), image_format
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(path, f"too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise ImageError(path, f"truncated or corrupt: {err}") from None


def resolve_inside(stored: str, base: Path, root: Path, where: str, hint: str = "") -> Path:
    """The file ``stored`` (relative to ``base``, or absolute) names, with every link followed, if it lies
    inside ``root`` and is a regular file of at most :data:`MAX_IMAGE_BYTES`; else :class:`RetrievalError`
    naming ``where`` (the record) and what is wrong. ``hint`` ends the message of a path outside ``root``."""
    path = Path(stored).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise RetrievalError(f"{where}: {stored} does not exist") from None
    except (OSError, RuntimeError, ValueError) as err:  # a loop of links, a part that is no folder, a NUL byte
        reason = getattr(err, "strerror", None) or err
        raise RetrievalError(f"{where}: {stored} cannot be resolved ({reason})") from None
    root = root.resolve()
    if not real.is_relative_to(root):
        raise RetrievalError(f"{where}: {stored} is {real}, outside the index root {root}; an index may only "
                             f"name files inside its root{hint}")
    try:
        info = real.stat()
    except OSError as err:
        raise RetrievalError(f"{where}: {stored} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise RetrievalError(f"{where}: {stored} is {_file_kind(info.st_mode)}, not an image file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise RetrievalError(f"{where}: {stored} is too large ({info.st_size} bytes, at most {MAX_IMAGE_BYTES})")
    return real


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

    try:
        records, bad = parse_jsonl(jsonl, parse)
    except UnicodeDecodeError as err:
        raise DataError(f"collection: {jsonl} is not UTF-8 text ({err}); a JSONL collection is UTF-8 JSON lines") \
            from None
    except OSError as err:
        raise DataError(f"collection: cannot read {jsonl}: {err.strerror or err}") from None
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
            images.append(read_image_file(record.path).image)
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
