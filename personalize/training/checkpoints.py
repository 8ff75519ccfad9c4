"""Checkpoint folders that are either complete or invisible, and hold no pickle.

A checkpoint ``checkpoints/checkpoint-N`` holds

- ``trainable_weights.safetensors``: the method's trainable weights;
- ``training_state.json`` + ``.safetensors``: optimizer, LR schedule, EMA and grad-scaler state
  (:mod:`personalize.utils.safe_state`: tensors in safetensors, the rest as JSON);
- ``rng_state_R.json`` + ``.safetensors``: the random generators of process R;
- ``trainer_state.json``, written last: the step, the method and the run's config.

Everything is written into ``checkpoints/.tmp-checkpoint-N`` and renamed into place only when complete,
so a kill during a save leaves a ``.tmp-`` folder that resume ignores and the next save removes.
Resuming reads only JSON and safetensors. A checkpoint folder that holds a pickle (accelerate's
``save_state`` format, or a planted file) is refused unless ``model.allow_pickle: true``; so is one
whose run-defining config differs from the current run's (the differing keys are named).
A stop request (SIGINT/SIGTERM, :class:`StopRequest`) lets the trainer finish its step and save a
checkpoint before it exits, so a stopped run loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from personalize.errors import CheckpointError
from personalize.utils.safe_state import load_tree, save_tree
from personalize.utils.trees import flatten

logger = logging.getLogger("personalize")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable_weights.safetensors"
TRAINING_STATE = "training_state"  # .json + .safetensors
FORMAT = 2  # 1: accelerate's save_state (pickles)
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".ckpt", ".pickle")
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Config keys that do not change what a run computes: a resumed run may differ in these.
RUN_INDEPENDENT = ("train.output_dir", "train.resume", "train.overwrite", "train.progress_bar", "train.report_to",
                   "train.log_every", "train.checkpoint_every", "train.checkpoints_total_limit", "data.num_workers",
                   "model.allow_pickle", "validation.")
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


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
        raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
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
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {err}); resume from another checkpoint "
                              f"(train.resume=PATH) or remove {checkpoint}") from None
    problems = [k for k, kind in (("global_step", int), ("method", str), ("config", dict))
                if not isinstance(state.get(k) if isinstance(state, dict) else None, kind)]
    if problems:
        raise CheckpointError(f"{path} is damaged (missing or wrong {', '.join(problems)}); resume from another "
                              f"checkpoint (train.resume=PATH) or remove {checkpoint}")
    return state


# -- what defines a run ----------------------------------------------------------------------------

def run_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two configs (``Config.to_dict()``), ignoring those that do not
    change what the run computes; ``train.max_steps`` may grow under a constant LR schedule."""
    a, b = flatten(saved), flatten(current)
    constant = b.get("train.lr_scheduler") in CONSTANT_SCHEDULES
    ignored = RUN_INDEPENDENT + (("train.max_steps",) if constant else ())
    out = []
    for key in sorted(set(a) & set(b)):
        if key.startswith(ignored) or key in ignored:
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key} ({a.get(key)!r} in the checkpoint, {b.get(key)!r} now)")
    return out


# -- save and load ---------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, source: Path) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(tuple(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: damaged random-generator state ({err})") from None


def save(accelerator, root: Path, step: int, state: dict, keep: Optional[int], weights: dict,
         training_state: dict) -> Path:
    """Write a checkpoint into a temporary folder (each process its RNG, the main process the rest),
    then :func:`finalize` it as ``checkpoint-{step}`` with ``state``; returns the checkpoint folder."""
    from safetensors.torch import save_file

    tmp = temporary_dir(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tree(rng_state(), tmp / f"rng_state_{accelerator.process_index}")
    if accelerator.is_main_process:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        save_tree(training_state, tmp / TRAINING_STATE)
    accelerator.wait_for_everyone()
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        final = finalize(tmp, root, step, {**state, "format": FORMAT}, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def state_of(stateful: dict) -> dict:
    """``{name: obj.state_dict()}`` of the trainer's stateful objects (None stays None)."""
    return {name: obj.state_dict() if obj is not None else None for name, obj in stateful.items()}


def restore(checkpoint: Path, load_weights, stateful: dict, training_state: dict) -> None:
    """Load the weights (``load_weights()``) and each stateful object's state; a part that does not fit this
    run (another rank, another optimizer) is a :class:`CheckpointError` naming it."""
    parts = [(WEIGHTS_FILE, load_weights)]
    for name, obj in stateful.items():
        if obj is not None and training_state.get(name) is not None:
            parts.append((name, lambda obj=obj, name=name: obj.load_state_dict(training_state[name])))
        elif obj is not None and name != "scaler":  # a grad scaler appears only with fp16 on a GPU
            raise CheckpointError(f"{checkpoint}: holds no {name} state; resume from another checkpoint or drop "
                                  "train.resume to start from step 0")
    for name, load in parts:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{checkpoint}: its {name} state does not fit this run ({err}); resume from "
                                  f"another checkpoint or drop train.resume to start from step 0") from None


def register_accelerate_format(accelerator, method, stateful: list) -> None:
    """For accelerate's own ``save_state`` / ``load_state`` (DeepSpeed, and checkpoints of earlier versions
    resumed with ``model.allow_pickle``): save and load only the method's trainable weights, and the schedule
    and EMA (``stateful``; None entries are skipped) as accelerate's custom checkpoints."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir) -> None:
        weights.clear()  # accelerate would save full models
        if accelerator.is_main_process:
            save_file(method.trainable_state_dict(), str(Path(output_dir) / WEIGHTS_FILE))

    def load_hook(models, input_dir) -> None:
        models.clear()
        method.load_trainable_state_dict(load_file(str(Path(input_dir) / WEIGHTS_FILE)))

    for obj in stateful:
        if obj is not None:
            accelerator.register_for_checkpointing(obj)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_with_accelerate(accelerator, root: Path, step: int, state: dict, keep: Optional[int]) -> Path:
    """DeepSpeed only: ``accelerator.save_state`` (DeepSpeed's own, pickled format); resuming it needs
    ``model.allow_pickle: true``."""
    tmp = temporary_dir(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        final = finalize(tmp, root, step, {**state, "format": 1}, keep)
    accelerator.wait_for_everyone()
    return final


def pickles_in(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)


def find_resume(resume_from: Optional[str], root: Path, method: str, config: dict,
                allow_pickle: bool) -> Optional[tuple[Path, dict]]:
    """The checkpoint that ``train.resume`` names (``auto``: the newest in ``root``) and its state, after
    checking that it belongs to this run; None when there is nothing to resume."""
    checkpoint = resolve_resume(resume_from, root)
    if checkpoint is None:
        if resume_from is None and checkpoint_dirs(root):
            logger.warning("%s holds checkpoints of an earlier run; starting from step 0 anyway "
                           "(set train.resume=auto to continue it)", root)
        if resume_from == "auto":
            logger.info("resume: auto found no checkpoint in %s; starting from step 0", root)
        return None
    state = read_state(checkpoint)
    if state["method"] != method:
        raise CheckpointError(f"{checkpoint} was written by method {state['method']!r}, not {method!r}")
    differences = run_differences(state["config"], config)
    if differences:
        raise CheckpointError(
            f"{checkpoint} belongs to another run: " + "; ".join(differences) + ". Use the checkpoint's settings, "
            "another train.output_dir, or drop train.resume to start from step 0")
    pickled = pickles_in(checkpoint)
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{checkpoint} holds pickled files ({', '.join(p.name for p in pickled)}), which can execute code when "
            f"loaded; personalize never writes them. Remove them, or set model.allow_pickle=true if you trust this "
            f"folder (checkpoints of earlier personalize versions need it)")
    return checkpoint, state


def load(accelerator, checkpoint: Path, state: dict) -> tuple[dict, dict]:
    """(trainable weights, training state) of ``checkpoint``; sets this process's RNG state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_file = checkpoint / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} is missing; resume from another checkpoint or remove {checkpoint}")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_file} is damaged or truncated ({err}); resume from another checkpoint "
                              f"or remove {checkpoint}") from None
    training_state = load_tree(checkpoint / TRAINING_STATE)
    if not isinstance(training_state, dict) or "optimizer" not in training_state:
        raise CheckpointError(f"{checkpoint / TRAINING_STATE}.json is damaged (no optimizer state)")
    rng = checkpoint / f"rng_state_{accelerator.process_index}"
    if rng.with_suffix(".json").is_file():
        set_rng_state(load_tree(rng), rng.with_suffix(".json"))
    return weights, training_state


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
    checkpoint and stops (:class:`TrainingStopped`); a second signal stops at once. With ``immediate``
    (set-up: loading models, generating class images, caching) the first signal stops at once."""

    def __init__(self, immediate: bool = False):
        self.signum = 0
        self.immediate = immediate

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self.immediate:
            logger.warning("got %s during set-up: stopping (nothing to save yet)", signal.Signals(signum).name)
            raise TrainingStopped(128 + signum)
        logger.warning("got %s: finishing this step, saving a checkpoint, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
