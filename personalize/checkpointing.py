"""Checkpoint folders that are either complete or invisible.

``accelerator.save_state`` writes into ``checkpoints/.tmp-checkpoint-N``; only after everything is on
disk (the last file written is ``trainer_state.json``) is the folder renamed to ``checkpoint-N``. A
kill during a save leaves a ``.tmp-`` folder that resume ignores and the next save removes.
A stop request (SIGINT/SIGTERM, :class:`StopRequest`) lets the trainer finish its step and save a
checkpoint before it exits, so a stopped run loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

logger = logging.getLogger("personalize")
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    """``None`` -> no resume; ``'auto'`` -> newest complete checkpoint (or none); else that folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def temporary_dir(root: Path, step: int) -> Path:
    return root / f".tmp-checkpoint-{step}"


def finalize(tmp: Path, root: Path, step: int, state: dict, keep: Optional[int]) -> Path:
    """Write the state file, fsync, rename ``tmp`` into place, and drop checkpoints beyond ``keep``."""
    state_path = tmp / STATE_FILE
    with open(state_path, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def save(accelerator, root: Path, step: int, state: dict, keep: Optional[int]) -> Path:
    """``accelerator.save_state`` into a temporary folder (every process), then :func:`finalize` it
    as ``checkpoint-{step}`` with ``state`` (the main process); returns the checkpoint folder."""
    tmp = temporary_dir(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        final = finalize(tmp, root, step, state, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, resume_from: Optional[str], root: Path, method: str) -> Optional[dict]:
    """Load the checkpoint that ``train.resume`` names (``auto``: the newest in ``root``) into
    ``accelerator`` and return its state (``global_step``, ``train_seconds``, ...), or None when
    there is nothing to resume; a missing checkpoint or one of another method stops with an error."""
    try:
        checkpoint = resolve_resume(resume_from, root)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    if checkpoint is None:
        if resume_from is None and checkpoint_dirs(root):
            logger.warning("%s holds checkpoints of an earlier run; starting from step 0 anyway "
                           "(set train.resume=auto to continue it)", root)
        if resume_from == "auto":
            logger.info("resume: auto found no checkpoint in %s; starting from step 0", root)
        return None
    state = read_state(checkpoint)
    if state["method"] != method:
        raise SystemExit(f"error: {checkpoint} was written by method {state['method']!r}, not {method!r}")
    accelerator.load_state(str(checkpoint))
    logger.info("resumed from %s at step %d", checkpoint, int(state["global_step"]))
    return state


def remove_stale_temporaries(root: Path) -> None:
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class TrainingStopped(SystemExit):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Exit code 128 + signal number."""


class StopRequest:
    """While active, SIGINT/SIGTERM only set ``signum``: the training loop finishes its step, saves a
    checkpoint and stops (:class:`TrainingStopped`); a second signal stops at once."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("got %s: finishing this step, saving a checkpoint, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
