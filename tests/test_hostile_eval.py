"""`personalize eval` on bad input: every case is refused with a message naming the option or file,
exit code 2, no traceback, before any model loads, and nothing the user had is changed or written."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_dreambench import write_bench

ROOT = Path(__file__).resolve().parent.parent


def tree(root: Path) -> dict:
    """Every path under ``root`` with its bytes (None for folders): what "nothing changed" compares."""
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if anything trains, builds a pipeline or loads metric weights."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr("personalize.training.trainer.Trainer", forbidden)
    monkeypatch.setattr("personalize.sampling.build_pipeline", forbidden)
    return forbidden


def refused(capsys, argv: list[str], *names: str) -> str:
    """Run ``personalize eval`` in-process; it must exit 2 with one error naming each of ``names``."""
    from personalize.cli import main

    code = main(["eval", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (libraries may print progress)
    assert errors, err
    message = err[err.index("error: "):]
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.fixture
def bench(tmp_path):
    return write_bench(tmp_path / "bench", {"dog": "dog"})


# -- --report-only --------------------------------------------------------------------------------

def test_report_only_on_an_empty_missing_or_damaged_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, ["--report-only", "--out", str(empty)], "--out", str(empty), "plan.json")
    refused(capsys, ["--report-only", "--out", str(tmp_path / "missing")], "--out", "missing")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "plan.json").write_text('{"title": "x", "rows": [')
    refused(capsys, ["--report-only", "--out", str(damaged)], str(damaged / "plan.json"))
    (damaged / "plan.json").write_text('{"title": "x", "rows": [{"label": "lora"}], "metrics": [], "subjects": '
                                       '[{"name": "dog", "slug": "dog", "class": "dog", "live": true, "prompts": 1}]}')
    (damaged / "lora" / "dog").mkdir(parents=True)
    (damaged / "lora" / "dog" / "result.json").write_text("[1, 2]")
    refused(capsys, ["--report-only", "--out", str(damaged)], str(damaged / "lora" / "dog" / "result.json"))
    (damaged / "plan.json").write_text('{"title": "x", "rows": "lora", "metrics": [], "subjects": []}')
    before = tree(tmp_path)
    refused(capsys, ["--report-only", "--out", str(damaged)], str(damaged / "plan.json"))
    assert tree(tmp_path) == before and not (tmp_path / "missing").exists()


# -- metric weights -------------------------------------------------------------------------------

class RunsCode:
    """A pickle that runs code when loaded (it would create ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_metric_weights_are_refused_and_never_run(tmp_path, bench, capsys, no_models):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}))
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(2)}, plain)
    dino = tmp_path / "dino"  # a transformers folder with only the pickled weights
    dino.mkdir()
    (dino / "config.json").write_text('{"model_type": "vit"}')
    torch.save({"a": torch.zeros(2)}, dino / "pytorch_model.bin")
    out = tmp_path / "out"
    before = tree(tmp_path)
    base = ["tiny/lora", "--data", str(bench), "--metrics", "dreambench", "--out", str(out)]
    err = refused(capsys, [*base, "--dino-weights", str(dino), "--clip-weights", str(plain)],
                  "--dino-weights", "pytorch_model.bin", "--clip-weights", str(plain), "--allow-pickle")
    assert "pickle" in err
    refused(capsys, [*base, "--dino-weights", str(plain), "--clip-weights", str(evil)], "--dino-weights",
            "is a file", "--clip-weights")
    # trusted with --allow-pickle, a pickle is still read only by torch's weights-only loader: refused, not run
    err = refused(capsys, [*base, "--allow-pickle", "--dino-weights", str(dino), "--clip-weights", str(evil)],
                  "--clip-weights", str(evil))
    assert not marker.exists()
    assert tree(tmp_path) == before and not out.exists()


def test_damaged_safetensors_are_refused(tmp_path, bench, capsys, no_models):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00garbage" * 20)
    foreign = tmp_path / "foreign.safetensors"  # a valid file, but not judges / not CLIP
    save_file({"x": torch.zeros(3)}, str(foreign))
    out = tmp_path / "out"
    before = tree(tmp_path)
    for judges in (garbage, foreign, tmp_path / "missing.safetensors"):
        refused(capsys, ["renders", "--toy", "zorbo", "--judges", str(judges), "--out", str(out)], "--judges",
                str(judges))
    refused(capsys, ["tiny/lora", "--data", str(bench), "--metrics", "dreambench", "--dino-weights", str(tmp_path),
                     "--clip-weights", str(foreign), "--out", str(out)], "--clip-weights", str(foreign))
    dino = tmp_path / "dino"  # a transformers ViT folder whose safetensors hold other tensors
    dino.mkdir()
    (dino / "config.json").write_text('{"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, '
                                      '"num_attention_heads": 2, "intermediate_size": 64, "image_size": 32}')
    save_file({"x": torch.zeros(3)}, str(dino / "model.safetensors"))
    clip = tmp_path / "clip.safetensors"
    before = tree(tmp_path)
    refused(capsys, ["tiny/lora", "--data", str(bench), "--metrics", "dreambench", "--dino-weights", str(dino),
                     "--clip-weights", str(clip), "--out", str(out)], "--dino-weights", "is not a DINO ViT",
            "--clip-weights", "does not exist")
    refused(capsys, ["renders", "--toy", "zorbo", "--metrics", "tiny", "--judges", str(foreign), "--out", str(out)],
            "--judges", "--metrics toy")  # given but unused: said, not ignored
    assert tree(tmp_path) == before and not out.exists()


# -- the output folder ----------------------------------------------------------------------------

def test_an_unusable_out_is_refused_before_any_model_loads(tmp_path, bench, capsys, monkeypatch, no_models):
    monkeypatch.setattr("personalize.metrics.load_metrics", no_models)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    theirs = tmp_path / "theirs"  # a folder holding a report this tool did not write
    theirs.mkdir()
    (theirs / "report.html").write_text("<p>my own report</p>")
    not_ours = tmp_path / "not-ours"
    not_ours.mkdir()
    (not_ours / "plan.json").write_text('{"my": "plan"}')
    before = tree(tmp_path)
    args = ["tiny/lora", "--data", str(bench), "--metrics", "tiny"]
    refused(capsys, [*args, "--out", str(a_file)], "--out", str(a_file), "is a file")
    refused(capsys, [*args, "--out", str(a_file / "sub")], "--out", "is a file")
    refused(capsys, [*args, "--out", str(theirs)], "--out", "report.html")
    refused(capsys, [*args, "--out", str(not_ours)], "--out", str(not_ours / "plan.json"))
    refused(capsys, [*args, "--out", str(tmp_path)], "--data", str(bench), "inside the output folder")
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_out_is_refused(tmp_path, bench, capsys, no_models):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(capsys, ["tiny/lora", "--data", str(bench), "--metrics", "tiny", "--out", str(locked / "out")],
                "--out", "cannot write")
        refused(capsys, ["--report-only", "--out", str(locked)], "--out")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


# -- settings, prompts, subjects, rows ------------------------------------------------------------

@pytest.mark.parametrize("extra, names", [
    (["-n", "0"], ["-n/--images-per-prompt", "got 0"]),
    (["--images-per-prompt", "-2"], ["-n/--images-per-prompt", "got -2"]),
    (["--steps", "0"], ["--steps"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--drift-images", "1"], ["--drift-images"]),
    (["--references", "-1"], ["--references"]),
    (["--resolution", "30"], ["--resolution", "multiple of 8"]),
    (["--guidance", "nan"], ["--guidance"]),
    (["--device", "nope"], ["--device", "nope"]),
    (["--prompts", "99"], ["--prompts", "[99]", "out of range"]),
    (["--prompts", "0,0"], ["--prompts", "more than once"]),
    (["--prompts", ","], ["--prompts", "at least one"]),
    (["--subjects", "cat"], ["--subjects", "no photos of cat"]),
])
def test_bad_settings_are_refused_naming_the_option(tmp_path, bench, capsys, no_models, extra, names):
    out = tmp_path / "out"
    before = tree(tmp_path)
    refused(capsys, ["tiny/lora", "base", "--data", str(bench), "--metrics", "tiny", "--out", str(out), *extra],
            *names)
    assert tree(tmp_path) == before and not out.exists()


@pytest.mark.parametrize("argv, names", [
    (["renders", "--toy", "nope"], ["--toy", "unknown toy subjects nope", "zorbo"]),
    (["renders", "--toy", "zorbo", "--subjects", "plimm"], ["--subjects", "plimm"]),
    (["renders", "--toy", "zorbo", "--prompts", "20"], ["--prompts", "[20]", "0..19"]),
    (["renders", "--toy", "zorbo", "-n", "0"], ["-n/--images-per-prompt"]),
    (["renders", "--data", "{bench}"], ["renders", "toy-world subjects", "dog"]),
    (["base", "--data", "{bench}"], ["base", "--base"]),
    (["incontext", "--toy", "zorbo"], ["incontext:FOLDER"]),
    (["incontext:{tmp}", "--toy", "zorbo"], ["config.json"]),
    (["nope/recipe", "--toy", "zorbo"], ["nope/recipe", "does not exist"]),
    (["tiny/lora", "--toy", "zorbo", "--set", "train.max_stepz=2"], ["train.max_stepz", "max_steps"]),
    (["tiny/lora", "tiny/lora", "--toy", "zorbo"], ["distinct labels"]),
    (["tiny/lora", "--data", "{tmp}/missing"], ["--data", "missing"]),
    (["tiny/lora"], ["--data", "--toy"]),
    (["--toy", "zorbo"], ["ROW"]),
])
def test_bad_subjects_and_rows_are_refused(tmp_path, bench, capsys, no_models, argv, names):
    out = tmp_path / "out"
    argv = [a.format(bench=bench, tmp=tmp_path) for a in argv]
    before = tree(tmp_path)
    refused(capsys, [*argv, "--out", str(out)], *names)
    assert tree(tmp_path) == before and not out.exists()


def test_argument_syntax_errors_are_argparse_usage_errors(tmp_path, capsys):
    from personalize.cli import main

    for argv in (["--prompts", "a,b"], ["--ref-interval", "0.8,0.2"], ["-n", "two"]):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "renders", "--toy", "zorbo", "--out", str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and argv[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_scripts_refuse_the_same_way(tmp_path):
    """eval/dreambench.py and eval/toybench.py: the same messages and exit code, in a real process."""
    for script, argv in (("eval/dreambench.py", ["--report-only", "--out", str(tmp_path)]),
                         ("eval/toybench.py", ["--subjects", "zorbo", "--rows", "ceiling", "-n", "0", "--out",
                                               str(tmp_path / "out"), "--doc", ""])):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2 and "error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
