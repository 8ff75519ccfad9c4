"""The files of an index folder and their checks: which files an index is (:data:`FILES`), whether a
folder may receive one (:func:`check_index_folder`, :func:`refuse_inputs_among_outputs`), and reading its
``index.json`` and ``records.jsonl`` as untrusted input (:func:`read_meta`, :func:`read_records`): anything
that is not what :func:`~personalize.retrieval.index.write_index` writes is a :class:`RetrievalError` (or,
for an output folder, an :class:`OutputError`) naming the file, and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from personalize.data.jsonl import parse_jsonl
from personalize.errors import OutputError
from personalize.retrieval.errors import RetrievalError
from personalize.retrieval.records import Record
from personalize.utils.files import read_json

TEXT_INDEX, IMAGE_INDEX, RECORDS, META = "index_text.faiss", "index_image.faiss", "records.jsonl", "index.json"
FILES = (TEXT_INDEX, IMAGE_INDEX, RECORDS, META)  # everything write_index writes, index.json last
FORMAT_VERSION = 1
BUILT_KINDS = ("flat", "ivf", "hnsw")  # the kinds an index.json names ("auto" is resolved when building)
MAX_META_BYTES = 1 << 20  # index.json is a few hundred bytes; a larger one is not an index's


def is_index_meta(meta_file: Path) -> bool:
    """Whether ``meta_file`` is an ``index.json`` that ``write_index`` wrote (a regular file, not a link)."""
    if meta_file.is_symlink() or not meta_file.is_file() or meta_file.stat().st_size > MAX_META_BYTES:
        return False
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and "embedder" in meta


def check_index_folder(index_dir: str | Path, overwrite: bool = True, option: str = "index_dir") -> Path:
    """``index_dir`` can receive an index: a folder (or none yet) holding none of :data:`FILES`, or an
    index written before (its ``index.json`` present) when ``overwrite``. Files of those names that are
    not an index's are never replaced. Raises :class:`OutputError` naming ``option``."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise OutputError(f"{option}: {index_dir} is a file, not a folder; choose a folder for the index")
    present = [name for name in FILES if os.path.lexists(index_dir / name)]
    if not present:
        return index_dir
    if not is_index_meta(index_dir / META):
        raise OutputError(f"{option}: {index_dir} holds {', '.join(present)} but no index ({META}) written by "
                          "this tool; they would be overwritten. Choose another folder")
    if not overwrite:
        raise OutputError(f"{option}: {index_dir} holds an index already ({META}); set --overwrite to replace it, "
                          "or choose another folder")
    return index_dir


def refuse_inputs_among_outputs(index_dir: Path, source: Path, records: list[Record], caption_extension: str):
    """No input of a build (the collection JSONL, an image, a caption file) may be one of its outputs."""
    names = set(FILES)
    inputs = [source, *(r.path for r in records), *(r.path.with_suffix(caption_extension) for r in records)]
    outputs = None
    for path in inputs:
        if path.name in names:
            outputs = outputs or {os.path.realpath(index_dir / n) for n in FILES}
            if os.path.realpath(path) in outputs:
                raise OutputError(f"index_dir: {index_dir} would overwrite {path}, an input of the build; "
                                  "choose another folder for the index")


def is_count(value, least: int = 1) -> bool:
    """Whether ``value`` is a whole number (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_meta(meta_file: Path) -> dict[str, Any]:
    """``index.json``, checked: a UTF-8 JSON object with the keys and types :func:`~personalize.retrieval.index.write_index` writes."""
    rebuild = "; rebuild the index with data_tools/build_index.py"
    meta = read_json(meta_file, RetrievalError, "an index description", MAX_META_BYTES, rebuild)
    if not isinstance(meta, dict):
        raise RetrievalError(f"{meta_file}: not an index description (a JSON object), got {type(meta).__name__}"
                             f"{rebuild}")
    missing = [k for k in ("embedder", "dims", "kind", "count") if k not in meta]
    if missing:
        raise RetrievalError(f"{meta_file}: missing key(s) {', '.join(missing)}")
    problems = []
    embedder = meta["embedder"]
    if not (isinstance(embedder, dict) and isinstance(embedder.get("name"), str) and embedder["name"]
            and isinstance(embedder.get("fingerprint"), str)):
        problems.append(f"'embedder' must be {{\"name\": ..., \"fingerprint\": ...}} (strings), got {embedder!r}")
    dims = meta["dims"]
    if not (isinstance(dims, dict) and all(is_count(dims.get(k)) for k in ("text", "image"))):
        problems.append(f"'dims' must be {{\"text\": N, \"image\": N}} (whole numbers >= 1), got {dims!r}")
    if meta["kind"] not in BUILT_KINDS:
        problems.append(f"'kind' must be one of {', '.join(BUILT_KINDS)}, got {meta['kind']!r}")
    if not is_count(meta["count"]):
        problems.append(f"'count' must be a whole number >= 1, got {meta['count']!r}")
    params = meta.setdefault("params", {})
    if not (isinstance(params, dict) and all(isinstance(k, str) and is_count(v) for k, v in params.items())):
        problems.append(f"'params' must map names to whole numbers >= 1, got {params!r}")
    if problems:
        raise RetrievalError(f"{meta_file}: " + "; ".join(problems) + rebuild)
    return meta


def read_records(records_file: Path, count: int) -> tuple[list[dict[str, str]], list[int]]:
    """``records.jsonl``, checked: one ``{"path", "text"}`` object (non-empty strings) per line, ``count``
    of them; and the line number of each."""
    def parse(record: dict, line: int) -> tuple[int, dict[str, str]]:
        problems = [f"{key!r} must be a non-empty string, got {record.get(key)!r}" for key in ("path", "text")
                    if not isinstance(record.get(key), str) or not record[key].strip()]
        if problems:
            raise ValueError("; ".join(problems))
        return line, {"path": record["path"], "text": record["text"]}

    try:
        items, bad = parse_jsonl(records_file, parse)
    except UnicodeDecodeError as err:
        raise RetrievalError(f"{records_file}: not UTF-8 text ({err}); rebuild the index") from None
    except OSError as err:
        raise RetrievalError(f"{records_file}: cannot read: {err.strerror or err}") from None
    if bad:
        listed = "; ".join(f"line {number}: {problem}" for number, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise RetrievalError(f"{records_file}: {len(bad)} bad line(s): {listed}{more}; rebuild the index")
    if len(items) != count:
        raise RetrievalError(f"{records_file}: {len(items)} records but {META} says {count}")
    return [record for _, record in items], [line for line, _ in items]
