"""Build the in-context cluster manifest from image-caption records grouped by their source.

The in-context method (``personalize/data/clusters.py``) trains on clusters of images that show one
subject. Such clusters come from where images were found together: one folder per source, or one web
page (its URL) per source. Not every source shows one subject, so each cluster is checked with an
image embedder and kept only when its members look alike.

Input is either

- a folder tree ``ROOT/<source>/<image files>``: the cluster is the subfolder's name and a caption
  file beside an image (``NAME.txt``) is its caption, else ``default_caption``; or
- a JSONL of records ``{"file_name": ..., "text": ..., "url": SOURCE_PAGE_URL}`` (optionally
  ``"context"``), ``file_name`` relative to the JSONL; the cluster is the URL normalized by
  :func:`normalize_source_url`, so two spellings of one page end in one cluster.

The steps, in order: read the records and load every image once (every bad record or unusable image is
reported together, or skipped with ``skip_bad``); group by source, dropping repeated files; truncate
clusters larger than ``max_size`` (the first ``max_size`` by path are kept, so reruns agree) and drop
those smaller than ``min_size``; embed each remaining cluster and drop it when the mean cosine
similarity over its distinct pairs of images is below ``min_similarity``. The manifest (written with
:func:`personalize.data.clusters.write_manifest`) and ``<manifest stem>.stats.json`` (what was read,
kept, dropped and why) are written atomically, and only when at least one cluster is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import torch
from tqdm.auto import tqdm

from personalize.data.clusters import ClusterRecord, write_manifest
from personalize.data.images import IMAGE_EXTENSIONS, DataError, ImageError, load_image
from personalize.data.jsonl import parse_jsonl
from personalize.utils.files import atomic_write_json
from personalize.utils.tensors import pairwise_cosine

MAX_LISTED = 20  # bad records listed in an error message; the rest are counted


class ImageEmbedder(Protocol):
    """Anything that embeds images: ``ClipMetric``, ``ToyJudgeMetrics`` or a test's fake."""

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """(n, d) embeddings of n PIL images (or uint8 arrays)."""
        ...


@dataclass(frozen=True)
class SourceRecord:
    """One image-caption pair and the source it was found in (its cluster)."""

    source: str
    path: Path
    text: str
    context: Optional[str] = None
    where: str = ""  # where the record was read: "line N" of a JSONL, "" for a folder tree


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be used: where it is (a JSONL line, a file) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class BadRecordsError(DataError):
    """Bad records or unusable images; the message lists them (the first ``MAX_LISTED``), one per line."""

    def __init__(self, bad: Sequence[BadRecord], what: str):
        self.bad = list(bad)
        lines = [f"{what}: {len(bad)} bad record(s) (skip them with --skip-bad):"]
        lines += [f"  {b}" for b in bad[:MAX_LISTED]]
        if len(bad) > MAX_LISTED:
            lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
        super().__init__("\n".join(lines))


@dataclass
class ClusterStats:
    """What a build read, kept and dropped, and why; written as ``<manifest stem>.stats.json``."""

    input: str
    records_read: int = 0  # image files found / JSONL records, bad ones included
    records_skipped_bad: int = 0
    bad_records: list[str] = field(default_factory=list)  # the first MAX_LISTED, "where: reason"
    duplicate_records: int = 0  # a file listed again in the same cluster (the first one is kept)
    clusters_found: int = 0
    clusters_kept: int = 0
    clusters_truncated: int = 0  # larger than max_size: the first max_size by path kept
    records_written: int = 0
    kept: dict[str, dict] = field(default_factory=dict)  # cluster -> {"size", "similarity"}
    dropped_too_small: dict[str, int] = field(default_factory=dict)  # cluster -> size
    dropped_low_similarity: dict[str, float] = field(default_factory=dict)  # cluster -> similarity
    mean_similarity_kept: Optional[float] = None  # mean over kept clusters of their mean pair similarity
    min_size: int = 2
    max_size: Optional[int] = None
    min_similarity: Optional[float] = None

    def to_json(self) -> dict:
        """The stats file's content: counts first, then the dropped clusters with why, then the kept
        clusters with their size and similarity (to choose ``min_similarity`` from)."""
        out = asdict(self)
        kept = out.pop("kept")
        out["clusters_dropped"] = {
            "too_small": {"count": len(self.dropped_too_small), "min_size": self.min_size,
                          "clusters": out.pop("dropped_too_small")},
            "low_similarity": {"count": len(self.dropped_low_similarity), "min_similarity": self.min_similarity,
                               "clusters": out.pop("dropped_low_similarity")},
        }
        out["kept"] = kept
        return out

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"read {self.records_read} records from {self.input} ({self.records_skipped_bad} skipped as bad, "
                 f"{self.duplicate_records} duplicate) in {self.clusters_found} clusters"]
        kept = f"kept {self.clusters_kept} clusters ({self.records_written} records"
        if self.mean_similarity_kept is not None:
            kept += f", mean similarity {self.mean_similarity_kept:.3f}"
        lines.append(kept + ")")
        dropped = f"dropped {len(self.dropped_too_small)} too small (< {self.min_size} records)"
        if self.min_similarity is not None:
            dropped += f", {len(self.dropped_low_similarity)} below similarity {self.min_similarity}"
        if self.max_size is not None:
            dropped += f"; truncated {self.clusters_truncated} to {self.max_size} records"
        lines.append(dropped)
        return "\n".join(lines)


@dataclass
class BuildResult:
    records: list[ClusterRecord]
    stats: ClusterStats


# -- sources --------------------------------------------------------------------------------------

def normalize_source_url(url: str) -> str:
    """The cluster key of a source page URL: scheme and host lowercased, fragment and trailing slash
    dropped (``HTTPS://Example.com/a/#top`` -> ``https://example.com/a``). Raises ``ValueError`` for
    anything that is not an absolute URL."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"url {url!r} is not an absolute URL (need scheme://host/...)")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, ""))


def read_caption(caption_file: Path) -> tuple[str, str]:
    """(the caption, "") or ("", what is wrong with the caption file)."""
    try:
        text = caption_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return "", f"cannot read caption: {err}"
    return (text, "") if text else ("", "empty caption file")


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def read_folder_tree(root: str | Path, default_caption: Optional[str] = None,
                     caption_extension: str = ".txt") -> tuple[list[SourceRecord], list[BadRecord]]:
    """Records of ``ROOT/<source>/<image>`` (images directly in a source folder; hidden entries ignored).

    An image without a caption file and no ``default_caption``, an empty caption file and an image
    directly in ``root`` (no source) are bad records. Images are not opened here."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"input: folder {root} does not exist")
    records, bad = [], []
    for loose in sorted(p for p in root.iterdir() if _is_image(p)):
        bad.append(BadRecord(str(loose), f"directly in {root}, not in a source subfolder (ROOT/<source>/<image>)"))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            caption_file = path.with_suffix(caption_extension)
            if caption_file.is_file():
                text, problem = read_caption(caption_file)
                if problem:
                    bad.append(BadRecord(str(caption_file), problem))
                    continue
            elif default_caption:
                text = default_caption
            else:
                bad.append(BadRecord(str(path), f"no caption file {caption_file.name} and no --default-caption"))
                continue
            records.append(SourceRecord(folder.name, path, text))
    if not records and not bad:
        raise DataError(f"input: no images in the source subfolders of {root} ({len(folders)} subfolder(s); "
                        f"the layout is ROOT/<source>/<image>, images: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return records, bad


def read_jsonl(jsonl: str | Path) -> tuple[list[SourceRecord], list[BadRecord]]:
    """Records of a JSONL (``file_name``, ``text``, ``url``, optional ``context``); blank lines ignored.
    Lines that are not such a record are bad records named by line. Images are not opened here."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise DataError(f"input: {jsonl} does not exist")

    def parse(record: dict, line: int) -> SourceRecord:
        for key in ("file_name", "text", "url"):
            if key not in record:
                raise ValueError(f"missing {key!r} (need file_name, text, url)")
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f"{key!r} must be a non-empty string, got {record[key]!r}")
        context = record.get("context")
        if context is not None and not isinstance(context, str):
            raise ValueError(f"'context' must be a string or null, got {context!r}")
        return SourceRecord(normalize_source_url(record["url"]), jsonl.parent / record["file_name"],
                            record["text"].strip(), context, f"line {line}")

    records, bad = parse_jsonl(jsonl, parse)
    if not records and not bad:
        raise DataError(f"input: {jsonl} has no records")
    return records, [BadRecord(f"{jsonl} line {number}", problem) for number, problem in bad]


def read_source(source: str | Path, default_caption: Optional[str] = None,
                caption_extension: str = ".txt") -> tuple[list[SourceRecord], list[BadRecord]]:
    """Records of a folder tree or a JSONL file, whichever ``source`` is."""
    source = Path(source)
    if source.is_dir():
        return read_folder_tree(source, default_caption, caption_extension)
    if source.is_file():
        return read_jsonl(source)
    raise DataError(f"input: {source} does not exist (give a folder ROOT/<source>/<image> or a JSONL file)")


def check_images(records: Sequence[SourceRecord], progress: bool = False) -> tuple[list[SourceRecord], list[BadRecord]]:
    """Load every record's image once (decoding it fully); those that fail are bad records."""
    good, bad = [], []
    for record in tqdm(records, desc="checking images", disable=not progress):
        try:
            load_image(record.path)
        except ImageError as err:
            where = f"{record.where} ({record.path})" if record.where else str(record.path)
            bad.append(BadRecord(where, err.reason))
        else:
            good.append(record)
    return good, bad


# -- clusters -------------------------------------------------------------------------------------

def mean_pair_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of a cluster's image embeddings (n >= 2)."""
    return pairwise_cosine(embeddings, embeddings, exclude_self=True)


def _embed(embedder: ImageEmbedder, paths: list[Path]) -> torch.Tensor:
    """(n, d) embeddings of the images at ``paths``; an embedder that answers otherwise is an error."""
    out = embedder.embed_images([load_image(p) for p in paths])
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(paths):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{type(embedder).__name__}.embed_images returned {shape} for {len(paths)} images; "
                        "need a tensor (n, d)")
    if not torch.isfinite(out).all():
        raise ValueError(f"{type(embedder).__name__}.embed_images returned non-finite embeddings")
    return out


def group_records(records: Sequence[SourceRecord], stats: ClusterStats) -> dict[str, list[SourceRecord]]:
    """Records by source, each cluster sorted by path; a path repeated in one cluster is kept once."""
    clusters: dict[str, dict[Path, SourceRecord]] = {}
    for record in records:
        members = clusters.setdefault(record.source, {})
        if record.path in members:
            stats.duplicate_records += 1
        else:
            members[record.path] = record
    return {source: sorted(members.values(), key=lambda r: r.path.as_posix())
            for source, members in sorted(clusters.items())}


def build_clusters(records: Sequence[SourceRecord], embedder: ImageEmbedder, stats: ClusterStats,
                   min_size: int = 2, max_size: Optional[int] = None, min_similarity: Optional[float] = None,
                   batch_size: int = 64, progress: bool = False) -> list[ClusterRecord]:
    """The manifest records of the clusters kept by size and similarity (clusters by name, members by
    path); fills ``stats``. ``min_similarity`` None keeps every cluster of a usable size (their
    similarity is still measured). Images of several small clusters are embedded in one call of up to
    about ``batch_size`` images."""
    if min_size < 2:
        raise DataError(f"--min-size: {min_size}; a cluster needs at least 2 records (a target and an example)")
    if max_size is not None and max_size < min_size:
        raise DataError(f"--max-size: {max_size} is below --min-size {min_size}")
    stats.min_size, stats.max_size, stats.min_similarity = min_size, max_size, min_similarity
    clusters = group_records(records, stats)
    stats.clusters_found = len(clusters)
    sized: dict[str, list[SourceRecord]] = {}
    for source, members in clusters.items():
        if max_size is not None and len(members) > max_size:
            members = members[:max_size]
            stats.clusters_truncated += 1
        if len(members) < min_size:
            stats.dropped_too_small[source] = len(members)
        else:
            sized[source] = members

    similarity: dict[str, float] = {}
    batch: list[str] = []
    with tqdm(total=len(sized), desc="embedding clusters", disable=not progress) as bar:
        for i, source in enumerate(sized):
            batch.append(source)
            if sum(len(sized[s]) for s in batch) < batch_size and i < len(sized) - 1:
                continue
            embeddings = _embed(embedder, [r.path for s in batch for r in sized[s]])
            for s, part in zip(batch, embeddings.split([len(sized[s]) for s in batch])):
                similarity[s] = mean_pair_similarity(part)
            bar.update(len(batch))
            batch = []

    kept: list[ClusterRecord] = []
    kept_similarity = []
    for source, members in sized.items():
        if min_similarity is not None and similarity[source] < min_similarity:
            stats.dropped_low_similarity[source] = round(similarity[source], 4)
            continue
        kept_similarity.append(similarity[source])
        stats.kept[source] = {"size": len(members), "similarity": round(similarity[source], 4)}
        kept += [ClusterRecord(source, r.path, r.text, r.context) for r in members]
    stats.clusters_kept = len(kept_similarity)
    stats.records_written = len(kept)
    if kept_similarity:
        stats.mean_similarity_kept = round(sum(kept_similarity) / len(kept_similarity), 4)
    return kept


# -- the whole job --------------------------------------------------------------------------------

def stats_path(manifest: str | Path) -> Path:
    """Where the statistics of ``manifest`` go: ``<manifest stem>.stats.json`` beside it."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.stats.json")


def _write_json_atomically(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, data)


def _no_cluster_kept(stats: ClusterStats) -> DataError:
    why = [f"{len(stats.dropped_too_small)} too small (< --min-size {stats.min_size})"]
    if stats.dropped_low_similarity:
        best = max(stats.dropped_low_similarity.values())
        why.append(f"{len(stats.dropped_low_similarity)} below --min-similarity {stats.min_similarity} "
                   f"(the highest was {best:.3f})")
    return DataError(f"{stats.input}: no cluster kept of {stats.clusters_found}: {', '.join(why)}; "
                     "nothing written")


def build_manifest(source: str | Path, manifest: str | Path, embedder: ImageEmbedder, *,
                   default_caption: Optional[str] = None, caption_extension: str = ".txt", min_size: int = 2,
                   max_size: Optional[int] = None, min_similarity: Optional[float] = None, skip_bad: bool = False,
                   batch_size: int = 64, progress: bool = False) -> BuildResult:
    """Read ``source`` (folder tree or JSONL), build the clusters and write ``manifest`` and its stats.

    Bad records and unusable images raise :class:`BadRecordsError` naming each (JSONL lines first,
    before any image is opened), or are skipped and counted with ``skip_bad``. Nothing is written when
    an error is raised or no cluster is kept (:class:`DataError` saying why)."""
    stats = ClusterStats(input=str(source))
    records, bad = read_source(source, default_caption, caption_extension)
    stats.records_read = len(records) + len(bad)
    if bad and not skip_bad:
        raise BadRecordsError(bad, str(source))
    records, bad_images = check_images(records, progress)
    if bad_images and not skip_bad:
        raise BadRecordsError(bad_images, str(source))
    bad += bad_images
    stats.records_skipped_bad = len(bad)
    stats.bad_records = [str(b) for b in bad[:MAX_LISTED]]

    kept = build_clusters(records, embedder, stats, min_size, max_size, min_similarity, batch_size, progress)
    if not kept:
        raise _no_cluster_kept(stats)
    write_manifest(kept, manifest)
    _write_json_atomically({"manifest": Path(manifest).name, **stats.to_json()}, stats_path(manifest))
    return BuildResult(kept, stats)
