"""Hostile and bad input to `personalize train` (issue 22): checkpoints that would run code, runs that
would continue or replace another run, concurrent runs, sizes that exhaust memory, unwritable output
folders, damaged checkpoints, a dangling link among the photos, a corrupt base model, the demo's own
output folder holding the user's photos.

Every case runs the real command line (in-process `personalize.cli.main`, or a subprocess where a
signal or a second process is the point) and asserts exit code 2, a message that names the file or
option, no traceback, and that nothing the user had changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import QUIET, ROOT
from personalize.training.checkpoints import PICKLE_SUFFIXES
from personalize.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
FAST = [*QUIET, "validation.prompts=[]", "train.lr_scheduler=constant"]


def train_args(out: Path, *overrides: str) -> list[str]:
    return ["train", "tiny/lora", f"train.output_dir={out}", *FAST, *overrides]


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as err:  # argparse
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden lock files aside) with its hash: what the user has there."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".personalize.lock")}


def assert_refused(code: int, text: str, *names: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    for name in names:
        assert name in text, f"{name!r} not in: {text}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny LoRA run of 2 steps with a checkpoint after each step (made once, copied per test)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(out, "train.max_steps=2", "train.checkpoint_every=1")) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def unfinished(run: Path) -> Path:
    """The run as a stopped one looks: checkpoints, no export."""
    for name in ("run_summary.json", "pytorch_lora_weights.safetensors", "config.yaml"):
        (run / name).unlink()
    return run


# -- 1. checkpoints hold no pickle, and a planted pickle never runs -----------------------------------
def test_checkpoints_hold_no_pickle(finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-2"
    files = sorted(p for p in checkpoint.iterdir())
    assert {p.name for p in files} >= {"trainable_weights.safetensors", "training_state.json",
                                       "training_state.safetensors", "rng_state_0.json", "trainer_state.json"}
    for path in files:  # each opens with a reader that cannot unpickle
        assert path.suffix in (".json", ".safetensors") and path.suffix not in PICKLE_SUFFIXES
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), "pt") as f:
                assert list(f.keys())
        assert not path.read_bytes().startswith((b"\x80", b"PK\x03\x04")), f"{path} looks like a pickle or torch zip"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_runs(run_copy, tmp_path, capsys, name):
    run = unfinished(run_copy)
    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), run / "checkpoints" / "checkpoint-2" / name)
    before = fingerprint(run)
    code, text = run_cli(capsys, train_args(run, "train.max_steps=3", "train.resume=auto"))
    assert_refused(code, text, name, "model.allow_pickle")
    assert not marker.exists(), "the pickled payload ran"
    assert fingerprint(run) == before


# -- 6. resume only the same run; a finished run is replaced only on request --------------------------
@pytest.mark.parametrize("override, key", [("train.seed=7", "train.seed"), ("lora.rank=8", "lora.rank"),
                                           ("train.learning_rate=1e-2", "train.learning_rate")])
def test_resume_auto_refuses_a_checkpoint_of_another_run(run_copy, capsys, override, key):
    run = unfinished(run_copy)
    before = fingerprint(run)
    code, text = run_cli(capsys, train_args(run, "train.max_steps=3", "train.resume=auto", override))
    assert_refused(code, text, key, "checkpoint-2")
    assert fingerprint(run) == before


def test_resume_auto_continues_the_same_run_with_more_steps(run_copy, capsys):
    run = unfinished(run_copy)
    code, text = run_cli(capsys, train_args(run, "train.max_steps=3", "train.resume=auto"))
    assert code == 0, text
    assert json.loads((run / "run_summary.json").read_text())["steps"] == 3


def test_a_finished_run_is_not_replaced_without_overwrite(run_copy, capsys):
    before = fingerprint(run_copy)
    code, text = run_cli(capsys, train_args(run_copy, "train.max_steps=2"))
    assert_refused(code, text, "train.overwrite=true", str(run_copy), "run_summary.json")
    assert fingerprint(run_copy) == before
    code, text = run_cli(capsys, train_args(run_copy, "train.max_steps=1", "train.overwrite=true"))
    assert code == 0, text
    assert json.loads((run_copy / "run_summary.json").read_text())["steps"] == 1


# -- 7. a failed rerun leaves the finished run as it was, config included -----------------------------
def test_a_failed_rerun_leaves_the_finished_run_and_its_config(run_copy, capsys):
    before = fingerprint(run_copy)
    code, text = run_cli(capsys, train_args(run_copy, "train.max_steps=2", "train.overwrite=true", "lora.rank=8",
                                            "train.learning_rate=1e30"))
    assert_refused(code, text, "not finite")
    after = fingerprint(run_copy)
    for name in ("config.yaml", "run_summary.json", "pytorch_lora_weights.safetensors"):
        assert after[name] == before[name], f"{name} changed"
    assert "rank: 4" in (run_copy / "config.yaml").read_text()


def test_a_full_disk_during_export_leaves_no_temporary_folder_and_no_finished_look(tmp_path, capsys, monkeypatch):
    import errno

    from personalize.methods.lora import LoRA

    def full_disk(self, models, out_dir):
        (out_dir / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LoRA, "export", full_disk)
    out = tmp_path / "run"
    code, text = run_cli(capsys, train_args(out, "train.max_steps=1", "train.checkpoint_every=1"))
    assert_refused(code, text, "train.output_dir", "No space left on device")
    assert not (out / ".export-tmp").exists()
    assert not (out / "run_summary.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoints" / "checkpoint-1").is_dir()  # the training is not lost


# -- 9. one run per output folder ------------------------------------------------------------------
def test_a_second_run_on_a_busy_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from personalize.utils.output_dir import OutputFolder\n"
                               f"with OutputFolder({str(out)!r}, 'train.output_dir').lock():\n"
                               "    print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        code, text = run_cli(capsys, train_args(out, "train.max_steps=1"))
        assert_refused(code, text, "in use by another run", f"pid {holder.pid}", "train.output_dir")
        assert time.monotonic() - start < 20
        assert not (out / "run_summary.json").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


# -- 11. sizes, and a stop request during set-up -------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["train.batch_size=1000000000000"], "train.batch_size"),
    (["train.batch_size=1000000"], "train.batch_size"),
    (["data.resolution=1000000", "data.min_image_size=1"], "data.resolution"),
    (["data.resolution=4096", "train.batch_size=1000"], "train.batch_size=1000"),
])
def test_sizes_beyond_any_machine_are_refused_before_anything_loads(tmp_path, capsys, overrides, key):
    start = time.monotonic()
    code, text = run_cli(capsys, train_args(tmp_path / "run", *overrides))
    assert_refused(code, text, key)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "run").exists()


def test_sigterm_during_set_up_stops_within_seconds(tmp_path):
    out = tmp_path / "run"
    # prior preservation with many class images to generate: a long set-up before the first step
    cmd = [sys.executable, "-m", "personalize", "train", "tiny/dreambooth", f"train.output_dir={out}", *FAST,
           "prior.enabled=true", f"prior.class_images={tmp_path / 'class'}", "prior.num_class_images=100000",
           "prior.generation_batch_size=1", "train.max_steps=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "class").glob("*.png")):  # set-up is generating class images
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "set-up never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = proc.wait(timeout=30)
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 10
    assert not list((tmp_path / "class").glob(".*.tmp")), "a half-written class image was left"
    assert not (out / "run_summary.json").exists()


# -- 12. unwritable or wrong output folders are found before the model loads ---------------------------
def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import personalize.training.trainer

    monkeypatch.setattr(personalize.training.trainer, "load_models", lambda *a: pytest.fail("the model was loaded"))
    target = tmp_path / "a-file"
    target.write_text("mine")
    code, text = run_cli(capsys, train_args(target, "train.max_steps=1"))
    assert_refused(code, text, "train.output_dir", str(target), "not a folder")
    assert target.read_text() == "mine"


def test_a_read_only_output_dir_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    import personalize.training.trainer

    monkeypatch.setattr(personalize.training.trainer, "load_models", lambda *a: pytest.fail("the model was loaded"))
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # root ignores permissions, so the file system says no
        if dir is not None and str(tmp_path) in str(dir):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, text = run_cli(capsys, train_args(tmp_path / "ro" / "run", "train.max_steps=1"))
    assert_refused(code, text, "train.output_dir", "Read-only file system")


# -- 12. damaged checkpoints ----------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: _truncate(c / "trainable_weights.safetensors"), "trainable_weights.safetensors"),
    (lambda c: (c / "training_state.safetensors").unlink(), "training_state.safetensors"),
    (lambda c: _truncate(c / "training_state.safetensors"), "training_state.safetensors"),
    (lambda c: _truncate(c / "training_state.json"), "training_state.json"),
    (lambda c: (c / "trainer_state.json").write_text("{not json"), "trainer_state.json"),
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": "x"}'), "trainer_state.json"),
], ids=["truncated-weights", "missing-optimizer", "truncated-optimizer", "truncated-state-json",
        "bad-trainer-state", "trainer-state-without-keys"])
def test_a_damaged_checkpoint_is_a_clear_error(run_copy, capsys, damage, named):
    run = unfinished(run_copy)
    damage(run / "checkpoints" / "checkpoint-2")
    before = fingerprint(run)
    code, text = run_cli(capsys, train_args(run, "train.max_steps=3", "train.resume=auto"))
    assert_refused(code, text, named)
    assert fingerprint(run) == before


# -- 13. a dangling link among the photos is named ------------------------------------------------------
def test_a_dangling_link_in_the_instance_folder_is_reported(tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(ROOT / "recipes" / "tiny" / "subject", photos)
    (photos / "gone.png").symlink_to(tmp_path / "missing.png")
    code, text = run_cli(capsys, train_args(tmp_path / "run", f"data.instance_images={photos}"))
    assert_refused(code, text, "gone.png", "symbolic link", "data.skip_bad_images")


# -- 12. a corrupt .safetensors as the base model --------------------------------------------------------
def test_a_corrupt_safetensors_base_model_is_a_clear_error(tmp_path, capsys):
    base = tmp_path / "model.safetensors"
    base.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, text = run_cli(capsys, train_args(tmp_path / "run", f"model.base={base}"))
    assert_refused(code, text, "model.base", str(base))
    assert not (tmp_path / "run").exists()


# -- 5. the demo never deletes the user's photos -------------------------------------------------------
def test_the_demo_refuses_an_output_folder_that_holds_the_subject(tmp_path, capsys):
    out = tmp_path / "OUT"
    photos = out / "your-references"
    shutil.copytree(ROOT / "recipes" / "tiny" / "subject", photos)
    before = fingerprint(out)
    code, text = run_cli(capsys, ["demo", "--subject", str(photos), "--out", str(out)])
    assert_refused(code, text, "--subject", str(photos), "--out")
    assert fingerprint(out) == before


# -- 1. checkpoints of earlier versions (accelerate's pickled format) resume only when trusted ---------
def test_a_pickled_checkpoint_of_an_earlier_version_resumes_only_with_allow_pickle(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from personalize.training.trainer import Trainer

    reference = tmp_path / "reference"
    assert main(train_args(reference, "train.max_steps=3")) == 0
    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_deepspeed", lambda self: True)  # accelerate's save_state, as before
    assert main(train_args(out, "train.max_steps=2", "train.checkpoint_every=2")) == 0
    monkeypatch.undo()
    assert (out / "checkpoints" / "checkpoint-2" / "custom_checkpoint_0.pkl").is_file()
    unfinished(out)
    code, text = run_cli(capsys, train_args(out, "train.max_steps=3", "train.resume=auto"))
    assert_refused(code, text, "model.allow_pickle", "custom_checkpoint_0.pkl")
    code, text = run_cli(capsys, train_args(out, "train.max_steps=3", "train.resume=auto", "model.allow_pickle=true"))
    assert code == 0, text
    want = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# -- 12. recipes and overrides that are not what they claim ----------------------------------------------
@pytest.mark.parametrize("args, named", [
    (["train", "BINARY"], "not a text file"),
    (["train", "tiny/lora", "train.seed=["], "train.seed=["),
    (["train", "tiny/lora", "train.learning_rate=.inf"], "train.learning_rate"),
    (["train", "tiny/lora", "train.max_steps=0"], "train.max_steps"),
])
def test_bad_recipes_and_overrides_are_clear_errors(tmp_path, capsys, args, named):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    args = [str(binary) if a == "BINARY" else a for a in args]
    code, text = run_cli(capsys, [*args, f"train.output_dir={tmp_path / 'run'}"])
    assert_refused(code, text, named)
    assert not (tmp_path / "run").exists()
