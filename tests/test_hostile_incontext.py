"""Hostile and broken inputs of ``personalize zero-shot``, retrieval indexes and data_tools/build_index.py:
each is refused with a message naming the option or file (exit code 2, no traceback), before anything is
written; an index cannot make the command read a file outside its root (``/etc/passwd``, ``../``, a
symbolic link out of it) or a device (``/dev/zero``); the output folder never overwrites an input, a
finished run (unless --overwrite, which removes only what the earlier run wrote) or a file it did not
write. Built on the tiny in-context model (K = 2) and a toy-world index of 6 renders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, load_script, run_training

faiss = pytest.importorskip("faiss", reason="retrieval needs faiss: pip install faiss-cpu")

from personalize.retrieval import FILES, META, RECORDS, TEXT_INDEX  # noqa: E402

REFS = [ROOT / "recipes/tiny/subject/00.png", ROOT / "recipes/tiny/subject/01.png"]
DEV_ZERO = Path("/dev/zero")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny in-context model (trained 1 step; K = 2), a toy named collection of 3 subjects x 2 renders and
    an index over it (the collection beside the index, as build_index.py writes it)."""
    from personalize.retrieval import ToyEmbedder, build_index, toy_named_collection

    root = tmp_path_factory.mktemp("hostile")
    run_training("tiny/incontext", root / "model", "train.max_steps=1", "train.mixed_precision=no")
    subjects = toy_named_collection(root / "collection", n_subjects=3, per_subject=2, seed=0)
    build_index(root / "collection", root / "index", ToyEmbedder())
    outside = root / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(outside / "secret.png")
    return {"root": root, "model": root / "model" / "run", "index": root / "index",
            "collection": root / "collection", "subjects": subjects, "secret": outside / "secret.png"}


def cli(capsys, *argv) -> tuple[int, str]:
    """Run ``personalize ARGV`` in-process: (exit code, stderr)."""
    from personalize.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refuses an option value
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def zero_shot(world, out, *more):
    return ["zero-shot", "--model", world["model"], "--prompt", "a toy in the snow", "-n", "1", "--steps", "1",
            "--out", out, *more]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (none when it does not exist) with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the refusal must come before."""
    from personalize.incontext.pipeline import InContextPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(InContextPipeline, "from_pretrained", refuse)


def copy_index(world, folder: Path, records=None) -> Path:
    """A copy of the world's index in ``folder`` (beside it, so relative record paths still resolve), with
    every record's path replaced by ``records`` (a callable of the record's number) if given."""
    folder.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(world["index"] / name, folder / name)
    if records is not None:
        lines = [json.loads(line) for line in (folder / RECORDS).read_text().splitlines()]
        (folder / RECORDS).write_text("".join(json.dumps({**r, "path": str(records(i))}) + "\n"
                                              for i, r in enumerate(lines)))
    return folder


def hostile_index(world, tmp_path, path) -> Path:
    """An index every record of which names ``path`` (a stored path, relative to the index folder or not)."""
    return copy_index(world, world["root"] / f"hostile-{tmp_path.name}", lambda i: path)


# -- (3) an index cannot read outside its root, a device, or an unbounded file ----------------------

@pytest.mark.parametrize("stored", ["/etc/passwd", "../../../../../../../../etc/passwd", "../outside/secret.png",
                                    "/dev/zero"])
def test_records_outside_the_index_root_are_refused_and_nothing_lands_in_out(world, tmp_path, capsys, stored,
                                                                             no_model_load):
    index = hostile_index(world, tmp_path, stored)
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--index", index))
    assert code == 2 and f"{index / RECORDS} line " in err and stored in err and "outside the index root" in err
    assert "--index-root" in err  # says how to trust another root
    assert not out.exists()


def test_a_symbolic_link_out_of_the_root_is_refused(world, tmp_path, capsys, no_model_load):
    index = hostile_index(world, tmp_path, "link.png")
    (index / "link.png").symlink_to(world["secret"])
    (index / "zero.png").symlink_to(DEV_ZERO)
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--index", index))
    assert code == 2 and "link.png" in err and str(world["secret"]) in err and "outside the index root" in err
    assert not out.exists()
    index2 = copy_index(world, world["root"] / f"zero-{tmp_path.name}", lambda i: "zero.png")
    (index2 / "zero.png").symlink_to(DEV_ZERO)
    code, err = cli(capsys, *zero_shot(world, out, "--index", index2))
    assert code == 2 and "zero.png is /dev/zero, outside the index root" in err and not out.exists()


@pytest.mark.skipif(not DEV_ZERO.exists(), reason="needs /dev/zero")
def test_with_a_wide_root_devices_and_non_images_are_still_refused(world, tmp_path, capsys, no_model_load):
    """--index-root / trusts the whole machine: still only regular image files are read, and none is copied."""
    out = tmp_path / "out"
    for stored, reason in (("/dev/zero", "/dev/zero is a character device, not an image file"),
                           ("/etc/passwd", "/etc/passwd: not an image")):
        if not Path(stored).exists():
            continue
        index = copy_index(world, world["root"] / f"wide-{tmp_path.name}-{Path(stored).name}", lambda i: stored)
        code, err = cli(capsys, *zero_shot(world, out, "--index", index, "--index-root", "/"))
        assert code == 2 and reason in err and f"{index / RECORDS} line" in err, err
        assert not out.exists()


def test_fifos_folders_large_files_bombs_and_non_images_inside_the_root_are_refused(world, tmp_path, capsys,
                                                                                    no_model_load):
    index = copy_index(world, world["root"] / f"inside-{tmp_path.name}")
    os.mkfifo(index / "fifo.png")
    (index / "folder.png").mkdir()
    with open(index / "big.png", "wb") as f:  # sparse: 64 MiB + 1 byte that take no disk
        f.truncate(64 * 2**20 + 1)
    Image.new("1", (10_000, 10_000)).save(index / "bomb.png")  # 100 M pixels in a few kB
    (index / "text.png").write_text("not an image\n")
    out = tmp_path / "out"
    cases = {"fifo.png": "is a fifo, not an image file", "folder.png": "is a folder, not an image file",
             "big.png": "is too large (67108865 bytes", "bomb.png": "too large: Image size (100000000 pixels)",
             "text.png": "not an image (cannot identify image file)"}
    for name, reason in cases.items():
        lines = [json.loads(line) for line in (world["index"] / RECORDS).read_text().splitlines()]
        (index / RECORDS).write_text("".join(json.dumps({**r, "path": name}) + "\n" for r in lines))
        code, err = cli(capsys, *zero_shot(world, out, "--index", index))
        assert code == 2 and reason in err and name in err and RECORDS in err, (name, err)
        assert not out.exists()


def test_a_trusted_root_lets_the_index_work_and_copies_only_checked_bytes(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--index", world["index"], "--index-root", world["collection"],
                                       "--query", world["subjects"][0].query))
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "retrieved" / "retrieved.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert Path(line["source"]).is_relative_to(world["collection"].resolve())
        assert (out / "retrieved" / line["file"]).read_bytes() == Path(line["source"]).read_bytes()
    manifest = json.loads((out / "zero_shot.json").read_text())
    assert sorted(manifest["files"]) == sorted(["000.png", "grid.png", "retrieved/retrieved.jsonl",
                                                *(f"retrieved/{line['file']}" for line in lines)])


def test_the_real_command_prints_no_traceback(world, tmp_path):
    index = hostile_index(world, tmp_path, "/etc/passwd")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "personalize", "zero-shot", "--model", str(world["model"]),
                           "--index", str(index), "--prompt", "x", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "\nerror: --index: " in "\n" + proc.stderr and "Traceback" not in proc.stderr
    assert "/etc/passwd" in proc.stderr and not out.exists()


# -- (12) broken index files -------------------------------------------------------------------------

@pytest.mark.parametrize("name, data, expected", [
    (TEXT_INDEX, b"", "empty file, not a faiss index"),
    (TEXT_INDEX, b"garbage" * 10, "not a faiss index, or a truncated or damaged one"),
    (TEXT_INDEX, "truncate", "not a faiss index, or a truncated or damaged one"),
    (TEXT_INDEX, "dims", "index_text.faiss: holds 64-dimensional vectors but index.json says 128"),
    (RECORDS, b'{"path": "a.png", "text": "a"}\nnot json\n', "records.jsonl: 1 bad line(s): line 2: not JSON"),
    (RECORDS, b'{"path": 3, "text": "a"}\n', "line 1: 'path' must be a non-empty string, got 3"),
    (RECORDS, b"\xff\xfe\x00binary\n", "records.jsonl: not UTF-8 text"),
    (META, b"\xff\xfe\x00binary", "index.json: not UTF-8 text"),
    (META, b"[1, 2]", "index.json: not an index description (a JSON object), got list"),
    (META, b"{not json", "index.json: not JSON"),
    (META, "count", "'count' must be a whole number >= 1, got 'six'"),
    (META, "embedder", "no built-in embedder is called 'toy:text-evil+identity'"),
])
def test_broken_index_files_are_clear_errors(world, tmp_path, capsys, no_model_load, name, data, expected):
    index = copy_index(world, world["root"] / f"broken-{tmp_path.name}")
    meta = json.loads((index / META).read_text())
    if data == "truncate":
        data = (index / name).read_bytes()[:200]
    elif data == "dims":  # a text index of another dimension than index.json says
        import numpy as np

        flat = faiss.IndexFlatIP(64)
        flat.add(np.zeros((meta["count"], 64), np.float32))
        data = faiss.serialize_index(flat).tobytes()
    elif data == "count":
        data = json.dumps({**meta, "count": "six"}).encode()
    elif data == "embedder":
        data = json.dumps({**meta, "embedder": {"name": "toy:text-evil+identity", "fingerprint": "x"}}).encode()
    (index / name).write_bytes(data)
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--index", index, "--index-root", world["collection"]))
    assert code == 2 and expected in err and "--index:" in err, err
    assert not out.exists()


def test_index_option_errors(world, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    for more, expected in (
            (["--index", tmp_path / "nowhere"], "not an index folder (no index.json"),
            (["--index", world["index"], "--index-root", tmp_path / "nowhere"], "--index-root: "),
            (["--index", world["index"], "-k", "3"], "-k: 3 references, but this model was trained with at most 2"),
            (["--refs", *REFS, "-k", "2"], "-k: only with --index"),
            (["--refs", *REFS, "--query", "zorbo"], "--query: only with --index"),
            (["--refs", *REFS, "--index-root", tmp_path], "--index-root: only with --index"),
            (["--index", world["index"], "--query", "a", "--query-image", REFS[0]], "give one"),
            (["--index", world["index"], "--ref-captions", "a"], "--ref-captions: retrieved references"),
            (["--index", world["index"], "--index-root", world["collection"], "--query-image", DEV_ZERO],
             "--query-image: /dev/zero: a character device, not an image file")):
        code, err = cli(capsys, *zero_shot(world, out, *more))
        assert code == 2 and expected in err, (more, err)
        assert not out.exists()


# -- (12) option values, the in-context config and weights -------------------------------------------

@pytest.mark.parametrize("option, value, expected", [
    ("-n", "0", "argument -n: must be at least 1, got 0"),
    ("--steps", "0", "argument --steps: must be at least 1, got 0"),
    ("-k", "0", "argument -k: must be at least 1, got 0"),
    ("--seed", "-1", "argument --seed: must be between 0 and 2**63 - 1"),
    ("--text-scale", "nan", "argument --text-scale: must be a finite number"),
    ("--ref-scale", "inf", "argument --ref-scale: must be a finite number"),
    ("--device", "bogus", "--device: 'bogus' is not a device"),
])
def test_bad_option_values_are_refused_before_anything(world, tmp_path, capsys, no_model_load, option, value,
                                                       expected):
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--refs", *REFS), option, value)
    assert code == 2 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("change, expected", [
    (b"\x89\x00\xff binary \x00", "not UTF-8 text"),
    (b"{\"family\": ", "not JSON"),
    (b"[1]", "an in-context config is a JSON object, got list"),
    ({"num_references": "four"}, "num_references: expected a whole number of at least 1, got 'four'"),
    ({"num_references": True}, "num_references: expected a whole number of at least 1, got True"),
    ({"blocks": ["sideways"]}, "blocks: unknown block group(s) 'sideways'; choose from down, mid, up"),
    ({"blocks": "up"}, "blocks: expected a non-empty list of block groups"),
    ({"blocks": []}, "blocks: expected a non-empty list"),
    ({"num_refs": 2}, "unknown key 'num_refs'; did you mean 'num_references'?"),
    ({"reference_query": "sharp"}, "reference_query: expected one of shared, self, got 'sharp'"),
    ({"family": "dalle"}, "family: expected one of sd, sdxl, got 'dalle'"),
    ({"lora": {"r": 0, "target_modules": ["to_q"]}}, "lora: 'r' (the LoRA rank) must be a whole number"),
    ({"lora": {"r": 4}}, "lora: 'target_modules' must be a non-empty list"),
    ({"ref_scale": "six"}, "ref_scale: expected null or a finite number, got 'six'"),
    ({"unet_signature": [1]}, "unet_signature: expected a mapping"),
])
def test_bad_incontext_configs_are_refused_naming_the_file_and_key(world, tmp_path, capsys, no_model_load,
                                                                  change, expected):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    config = model / "incontext_config.json"
    if isinstance(change, bytes):
        config.write_bytes(change)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    refs_before = {r: r.read_bytes() for r in REFS}
    out = tmp_path / "out"
    argv = zero_shot(world, out, "--refs", *REFS)
    argv[2] = model
    code, err = cli(capsys, *argv)
    assert code == 2 and str(config) in err and expected in err, err
    assert not out.exists() and {r: r.read_bytes() for r in REFS} == refs_before


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "cannot read in-context weights: truncated, damaged or not safetensors"),
    ("empty", "cannot read in-context weights"),
    ("missing", "incontext_weights.safetensors: missing"),
    ("nan", "is not finite floating-point weights"),
])
def test_damaged_incontext_weights_are_clear_errors(world, tmp_path, capsys, damage, expected):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    weights = model / "incontext_weights.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "missing":
        weights.unlink()
    else:
        state = load_file(str(weights))
        name = next(k for k in state if "to_out_ref" in k)
        state[name] = state[name].clone().fill_(float("nan"))
        save_file(state, str(weights))
    out = tmp_path / "out"
    argv = zero_shot(world, out, "--refs", *REFS)
    argv[2] = model
    code, err = cli(capsys, *argv)
    assert code == 2 and "incontext_weights.safetensors" in err and expected in err, err
    assert not out.exists()


@pytest.mark.skipif(not DEV_ZERO.exists(), reason="needs /dev/zero")
def test_references_that_are_devices_fifos_or_missing_are_refused(world, tmp_path, capsys, no_model_load):
    os.mkfifo(tmp_path / "fifo.png")
    out = tmp_path / "out"
    for ref, expected in ((DEV_ZERO, "reference image /dev/zero: not a regular file"),
                          (tmp_path / "fifo.png", "fifo.png: not a regular file"),
                          (tmp_path / "missing.png", "missing.png: file does not exist")):
        code, err = cli(capsys, *zero_shot(world, out, "--refs", REFS[0], ref))
        assert code == 2 and expected in err, err
        assert not out.exists()


# -- (10) the output folder ----------------------------------------------------------------------------

def test_out_holding_a_reference_image_is_refused_and_the_image_is_kept(world, tmp_path, capsys, no_model_load):
    out = tmp_path / "photos"
    out.mkdir()
    for i, ref in enumerate(REFS):
        shutil.copyfile(ref, out / f"{i:03d}.png")  # named like the outputs
    before = snapshot(out)
    code, err = cli(capsys, *zero_shot(world, out, "--refs", out / "000.png", out / "001.png"))
    assert code == 2 and "--refs:" in err and "inside the output folder" in err and "--out" in err
    assert snapshot(out) == before


def test_out_that_is_a_file_or_holds_a_foreign_output_name_is_refused_before_the_model_loads(
        world, tmp_path, capsys, no_model_load):
    (tmp_path / "a-file").write_text("mine")
    code, err = cli(capsys, *zero_shot(world, tmp_path / "a-file", "--refs", *REFS))
    assert code == 2 and "--out:" in err and "is a file, not a folder" in err
    assert (tmp_path / "a-file").read_text() == "mine"
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my own grid")
    code, err = cli(capsys, *zero_shot(world, out, "--refs", *REFS))
    assert code == 2 and f"--out: {out / 'grid.png'} exists and was not written by an earlier zero-shot run" in err
    assert snapshot(out) == {"grid.png": b"my own grid"}


def test_a_finished_run_is_refused_and_overwrite_removes_only_its_files(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, *zero_shot(world, out, "--index", world["index"], "--index-root", world["collection"]),
                    "-n", "3")
    assert code == 0, err
    first = snapshot(out)
    assert {"000.png", "001.png", "002.png", "grid.png", "zero_shot.json", "retrieved/retrieved.jsonl"} <= set(first)
    (out / "notes.txt").write_text("the user's own file")

    code, err = cli(capsys, *zero_shot(world, out, "--refs", *REFS))
    assert code == 2 and "--out:" in err and "holds a finished run (zero_shot.json)" in err and "--overwrite" in err
    assert snapshot(out) == {**first, "notes.txt": b"the user's own file"}

    code, err = cli(capsys, *zero_shot(world, out, "--refs", *REFS, "--overwrite"))
    assert code == 0, err
    after = {name for name in snapshot(out) if not name.startswith(".personalize")}
    assert after == {"000.png", "grid.png", "zero_shot.json", "notes.txt"}  # no stale 001/002 or retrieved/
    assert not (out / "retrieved").exists()
    manifest = json.loads((out / "zero_shot.json").read_text())
    assert manifest["files"] == ["000.png", "grid.png"] and manifest["references"] == [str(r) for r in REFS]


# -- data_tools/build_index.py ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def build_script():
    return load_script("data_tools/build_index.py")


def run_script(script, capsys, *argv) -> tuple[int, str]:
    try:
        code = script.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err + captured.out if code == 0 else captured.err


def test_build_index_refuses_bad_inputs_and_outputs(world, tmp_path, capsys, build_script):
    collection = world["collection"]
    toy = ["--embedder", "toy", "--no-progress"]
    code, err = run_script(build_script, capsys, collection, tmp_path / "i", *toy, "--batch-size", "0")
    assert code == 2 and "argument --batch-size: must be at least 1" in err and not (tmp_path / "i").exists()

    (tmp_path / "bad.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff\xfe"}\n')
    code, err = run_script(build_script, capsys, tmp_path / "bad.jsonl", tmp_path / "i", *toy)
    assert code == 2 and f"{tmp_path / 'bad.jsonl'} is not UTF-8 text" in err and not (tmp_path / "i").exists()

    (tmp_path / "a-file").write_text("mine")
    code, err = run_script(build_script, capsys, collection, tmp_path / "a-file", *toy)
    assert code == 2 and "index_dir:" in err and "is a file" in err and (tmp_path / "a-file").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / RECORDS).write_text("my records\n")
    code, err = run_script(build_script, capsys, collection, foreign, *toy)
    assert code == 2 and "holds records.jsonl but no index" in err and snapshot(foreign) == {RECORDS: b"my records\n"}

    code, err = run_script(build_script, capsys, collection, tmp_path / "i", *toy, "--kind", "ivf", "--nlist", "50")
    assert code == 2 and "nlist: 50 cells for 6 records" in err and not (tmp_path / "i" / META).exists()

    inside = tmp_path / "self"  # an index folder whose images' caption files would be index.json
    copy_index(world, inside)
    shutil.copyfile(world["subjects"][0].files[0], inside / "index.png")
    before = snapshot(inside)
    code, err = run_script(build_script, capsys, inside, inside, *toy, "--caption-extension", ".json",
                           "--overwrite", "--skip-bad")
    assert code == 2 and f"would overwrite {inside / META}, an input of the build" in err
    assert snapshot(inside) == before

    before = snapshot(collection)
    code, err = run_script(build_script, capsys, collection, tmp_path / "i", *toy, "--toy-collection", "1", "1")
    assert code == 2 and "COLLECTION (--toy-collection):" in err and "is not empty" in err
    assert snapshot(collection) == before

    code, err = run_script(build_script, capsys, tmp_path / "toy", tmp_path / "toy-index", *toy,
                           "--toy-collection", "1", "1")
    assert code == 0 and "wrote 1 toy subjects" in err, err
    code, err = run_script(build_script, capsys, tmp_path / "toy", tmp_path / "toy-index-2", *toy,
                           "--toy-collection", "1", "1")
    assert code == 2 and "holds a finished run (.toy_collection.json); set --overwrite" in err


def test_build_index_refuses_a_finished_index_unless_overwrite(world, tmp_path, capsys, build_script):
    index = copy_index(world, tmp_path / "index")
    before = snapshot(index)
    code, err = run_script(build_script, capsys, world["collection"], index, "--embedder", "toy", "--no-progress")
    assert code == 2 and "holds an index already (index.json); set --overwrite" in err and snapshot(index) == before
    code, out = run_script(build_script, capsys, world["collection"], index, "--embedder", "toy", "--no-progress",
                           "--overwrite", "--query", world["subjects"][0].query)
    assert code == 0, out
    assert "--index-root" in out  # the collection is outside the index folder: says how to query it
    assert world["subjects"][0].name in out  # the query ran with the root this build wrote
