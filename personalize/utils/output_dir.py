"""Output folders a command may write into, checked before any model loads.

Every command that writes (``train``, ``generate``, ``zero-shot``, ``demo``, ``eval``) claims its
output folder through :class:`OutputFolder`:

- ``check()``: the folder is a folder (not a file), can be written (a probe file is created and
  removed in it, or in its nearest existing parent), holds none of the command's inputs, and does not
  hold a finished run unless the user said so (``--overwrite`` / ``train.overwrite=true``);
- ``lock()``: an exclusive :mod:`filelock` on ``.personalize.lock`` for as long as the command runs;
  a second command on the same folder fails at once, naming the holder (pid, host, command, start).

Nothing is deleted here: a command removes only the files its own earlier run listed in its manifest,
and only when the user asked to overwrite.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

from personalize.errors import OutputError

LOCK_NAME = ".personalize.lock"
HOLDER_NAME = ".personalize.lock.holder.json"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, option: str) -> Path:
    """``path`` is (or can be made) a writable folder; raise :class:`OutputError` naming ``option`` if not."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option}: {path} is a file, not a folder; choose a folder")
    parent = _nearest_existing(path.absolute())
    if not parent.is_dir():
        raise OutputError(f"{option}: {path} cannot be created: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".personalize-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{option}: cannot write into {parent}: {err.strerror or err}") from None
    return path


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` (after resolving links) is ``folder`` or lies below it."""
    try:
        Path(path).expanduser().resolve().relative_to(Path(folder).expanduser().resolve())
    except ValueError:
        return False
    return True


def refuse_inputs_inside(out: str | Path, option: str, inputs: Mapping[str, Iterable[str | Path]]) -> None:
    """An output folder must not hold a command's inputs: outputs could overwrite them."""
    for input_option, paths in inputs.items():
        for path in paths:
            if path is not None and inside(path, out):
                raise OutputError(f"{input_option}: {path} is inside the output folder {out} ({option}); outputs "
                                  f"could overwrite it. Choose another {option}, or move the input out of it")


class OutputFolder:
    """The output folder of one command (see the module docstring).

    ``finished``: the file whose presence means a finished run (``run_summary.json``); ``overwrite``: the
    user allowed replacing it, under the option ``overwrite_option``.
    """

    def __init__(self, path: str | Path, option: str = "--out", *, finished: Optional[str] = None,
                 overwrite: bool = False, overwrite_option: str = "--overwrite",
                 inputs: Optional[Mapping[str, Iterable[str | Path]]] = None):
        self.path = Path(path).expanduser()
        self.option = option
        self.finished = finished
        self.overwrite = overwrite
        self.overwrite_option = overwrite_option
        self.inputs = dict(inputs or {})

    def is_finished(self) -> bool:
        return bool(self.finished) and (self.path / self.finished).is_file()

    def check(self) -> "OutputFolder":
        check_writable(self.path, self.option)
        refuse_inputs_inside(self.path, self.option, self.inputs)
        if self.is_finished() and not self.overwrite:
            raise OutputError(f"{self.option}: {self.path} holds a finished run ({self.finished}); set "
                              f"{self.overwrite_option} to replace it, or choose another {self.option}")
        return self

    @contextmanager
    def lock(self) -> Iterator["OutputFolder"]:
        """Hold the folder's lock while the body runs (creates the folder)."""
        from filelock import FileLock, Timeout

        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{self.option}: cannot create {self.path}: {err.strerror or err}") from None
        lock = FileLock(str(self.path / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputError(f"{self.option}: {self.path} is in use by another run ({self._holder()}); wait for "
                              f"it to finish or choose another {self.option}") from None
        except OSError as err:
            raise OutputError(f"{self.option}: cannot lock {self.path}: {err.strerror or err}") from None
        holder = self.path / HOLDER_NAME
        try:
            holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            yield self
        finally:
            holder.unlink(missing_ok=True)
            lock.release()
            if created and {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
                # the command wrote nothing: leave no folder behind that it created
                (self.path / LOCK_NAME).unlink(missing_ok=True)
                for folder in created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break

    def _holder(self) -> str:
        try:
            info = json.loads((self.path / HOLDER_NAME).read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    # -- the manifest: what this command wrote, so that a rerun with --overwrite removes only that ------
    def previous_files(self) -> list[Path]:
        """Regular files the finished run's manifest (``finished``) lists, inside this folder."""
        if not self.is_finished():
            return []
        try:
            names = json.loads((self.path / self.finished).read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            return []
        files = [self.path / str(n) for n in names if isinstance(n, str)]
        return [f for f in files if f.is_file() and not f.is_symlink() and inside(f, self.path)]

    def remove_previous(self) -> list[Path]:
        """With ``overwrite``: remove the manifest first (the folder no longer looks finished), then the
        files it listed; nothing else. Returns what was removed."""
        if not (self.overwrite and self.is_finished()):
            return []
        files = self.previous_files()
        (self.path / self.finished).unlink()
        for f in files:
            f.unlink(missing_ok=True)
        return files

    def refuse_foreign(self, names: Iterable[str], command: str) -> None:
        """Each file this run would write (``names``, relative to the folder) must be absent, or listed by the
        finished run it replaces (with ``overwrite``): a file ``command`` did not write is never replaced."""
        previous = {os.path.abspath(f) for f in self.previous_files()} if self.overwrite else set()
        for name in names:
            path = self.path / name
            if os.path.lexists(path) and os.path.abspath(path) not in previous:
                raise OutputError(f"{self.option}: {path} exists and was not written by an earlier {command} run (no "
                                  f"{self.finished} lists it); it would be overwritten. Move it, or choose another "
                                  f"{self.option}")

    def write_manifest(self, files: Iterable[str | Path], **info) -> Path:
        """Write the ``finished`` manifest last: ``{"files": [names relative to the folder], **info}``."""
        from personalize.utils.files import atomic_write_json

        return atomic_write_json(self.path / self.finished, {"files": [self._name(f) for f in files], **info})

    def _name(self, file: str | Path) -> str:
        """A file's name relative to the folder: ``OUT/a/b.png`` or the relative ``a/b.png`` -> ``a/b.png``."""
        file = Path(file)
        for base in (self.path, self.path.absolute()):
            try:
                return str(file.relative_to(base))
            except ValueError:
                continue
        if file.is_absolute():
            raise ValueError(f"{file} is not inside {self.path}")
        return str(file)

    @contextmanager
    def claim(self) -> Iterator["OutputFolder"]:
        """``check()`` then ``lock()``, and ``check()`` again under the lock (another run may have finished)."""
        self.check()
        with self.lock():
            self.check()
            yield self


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain process): the one that holds locks."""
    return int(os.environ.get("RANK", "0") or 0) == 0
