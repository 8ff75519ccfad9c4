"""Atomic writes: a file is either its old self or complete, never half-written.

Each writer writes a hidden temporary file beside the target, fsyncs it and renames it into place;
on any error (a full disk, a read-only folder) the temporary file is removed and the error re-raised
as :class:`~personalize.errors.OutputError` naming the target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from personalize.errors import OutputError


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, else it is removed."""
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the permissions open() would give
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, value: Any) -> Path:
    return atomic_write_text(target, json.dumps(value, indent=2) + "\n")


def save_image(image, target: str | Path) -> Path:
    """``image.save`` (PIL; format from the suffix), atomically."""
    target = Path(target)
    with atomic_path(target) as tmp:
        image.save(tmp, format=_PIL_FORMATS.get(target.suffix.lower(), "PNG"))
    return target


_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def move_into(source: Path, folder: Path) -> list[Path]:
    """Move every item of ``source`` into ``folder`` (a same-named folder there is replaced, a file
    overwritten), then remove the emptied ``source``; returns the moved items' new paths."""
    moved = []
    for item in sorted(Path(source).iterdir()):
        target = Path(folder) / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        item.replace(target)
        moved.append(target)
    Path(source).rmdir()
    return moved


def read_json(path: str | Path, error: type[Exception], what: str = "JSON", max_bytes: Optional[int] = None,
              hint: str = "") -> Any:
    """The value of the JSON file ``path``; a missing, oversized, non-UTF-8 or malformed file raises
    ``error`` (a :class:`~personalize.errors.UserError`) naming the file, ``what`` it should be, and ``hint``."""
    path = Path(path)
    try:
        if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
            raise error(f"{path}: {size} bytes, too large for {what} (at most {max_bytes}){hint}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text, so not {what} ({err}){hint}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not JSON, so not {what} ({err}){hint}") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}{hint}") from None
