"""``personalize generate`` with bad inputs: each is refused with exit code 2 and a message naming the
option and the file, no traceback, nothing written into --out and nothing of the user's changed. And
its --out: a finished run is replaced only with --overwrite, which removes only what the previous
manifest lists; a file an earlier generate run did not write is never replaced."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from personalize.cli import main
from test_exports import lora_export

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Exported LoRA folders (both files) of tiny-sd and tiny-sdxl, with and without text encoder."""
    made = {}
    for name, base, overrides in (("sd", "tiny-sd", ["lora.train_text_encoder=true"]), ("sd-unet", "tiny-sd", []),
                                  ("sdxl", "tiny-sdxl", ["lora.train_text_encoder=true"]),
                                  ("sdxl-unet", "tiny-sdxl", [])):
        made[name] = lora_export(tmp_path_factory.mktemp(name), base, *overrides)[1]
    return made


@pytest.fixture
def embeddings(tmp_path):
    """A Textual Inversion file in the format the method exports: {token: (vectors, width)}."""
    path = tmp_path / "ti" / "learned_embeds.safetensors"
    path.parent.mkdir()
    save_file({"<sks-toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def generate(*args, out, n="1", base="tiny-sd"):
    return main(["generate", "--base", base, "--prompt", PROMPT, "-n", n, "--steps", "1", "--resolution", "64",
                 *args, "--out", str(out)])


def snapshot(*paths) -> dict:
    files = [f for p in paths for f in ([p] if Path(p).is_file() else sorted(Path(p).rglob("*")))]
    return {str(f): f.read_bytes() for f in files if f.is_file()}


def assert_refused(code, capsys, out, *needles, untouched=None, before=None):
    """Exit code 2, ``error: ...`` naming every needle, no traceback; --out absent (or, with ``before``,
    as it was) and the inputs of ``untouched`` (a :func:`snapshot`) unchanged."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err!r}"
    assert "internet" not in err
    if before is None:
        assert not Path(out).exists(), sorted(Path(out).iterdir())
    else:
        assert snapshot(out) == before
    if untouched is not None:
        assert snapshot(*{str(Path(f).parent) for f in untouched}) == untouched
    return err


# -- a LoRA or embedding made for another model ---------------------------------------------------
@pytest.mark.parametrize("base,lora,file,reason", [
    ("tiny-sd", "sdxl", "pytorch_lora_weights.safetensors", "SDXL LoRA"),
    ("tiny-sd", "sdxl", "pytorch_lora_weights_kohya.safetensors", "SDXL LoRA"),
    ("tiny-sd", "sdxl-unet", "pytorch_lora_weights.safetensors", "cross-attention"),
    ("tiny-sdxl", "sd", "pytorch_lora_weights.safetensors", "cross-attention"),
    ("tiny-sdxl", "sd", "pytorch_lora_weights_kohya.safetensors", "cross-attention"),
    ("tiny-sdxl", "sd-unet", "pytorch_lora_weights_kohya.safetensors", "cross-attention"),
])
def test_lora_of_another_family_is_refused(tmp_path, capsys, loras, base, lora, file, reason):
    path = loras[lora] / file
    kept = snapshot(loras[lora])
    out = tmp_path / "out"
    assert_refused(generate("--lora", str(path), base=base, out=out), capsys, out, "--lora", path, reason,
                   f"--base {base}", untouched=kept)


def test_lora_with_layers_the_base_lacks_is_refused(tmp_path, capsys, loras):
    """diffusers skips layers whose module it does not find (a warning at most): counted, and refused."""
    state = load_file(str(loras["sd"] / "pytorch_lora_weights_kohya.safetensors"))
    name = "lora_te_text_model_encoder_layers_99_self_attn_q_proj"
    state.update({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4),
                  f"{name}.alpha": torch.tensor(4.0)})
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    out = tmp_path / "out"
    assert_refused(generate("--lora", str(path), out=out), capsys, out, "--lora", path, "found their module")


def test_sd_embedding_on_sdxl_is_refused(tmp_path, capsys, embeddings):
    out = tmp_path / "out"
    assert_refused(generate("--embeddings", str(embeddings), base="tiny-sdxl", out=out), capsys, out,
                   "--embeddings", embeddings, "SDXL", "clip_l and clip_g")


def test_embedding_of_another_width_is_refused(tmp_path, capsys):
    path = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.zeros(1, 768)}, str(path))
    out = tmp_path / "out"
    assert_refused(generate("--embeddings", str(path), out=out), capsys, out, "--embeddings", path, "768-wide")


@pytest.mark.parametrize("token", ["cat", "photo"])
def test_token_already_in_the_vocabulary_is_refused(tmp_path, capsys, embeddings, token):
    out = tmp_path / "out"
    assert_refused(generate("--embeddings", str(embeddings), "--token", token, out=out), capsys, out,
                   "--token", repr(token), "already a token")


def test_stored_token_already_in_the_vocabulary_is_refused(tmp_path, capsys):
    path = tmp_path / "cat.safetensors"
    save_file({"cat": torch.zeros(1, 32)}, str(path))
    out = tmp_path / "out"
    assert_refused(generate("--embeddings", str(path), out=out), capsys, out, "--embeddings", path,
                   "stored token 'cat'", "--token")


def test_extra_vector_token_already_in_the_vocabulary_is_refused(tmp_path, capsys, embeddings):
    """Two vectors load as TOKEN and TOKEN_1; TOKEN_1 must be new too."""
    from personalize.config import ModelConfig
    from personalize.errors import ConfigError
    from personalize.methods.textual_inversion import load_embeddings
    from personalize.models import load_models

    pipe = load_models(ModelConfig(base="tiny-sd")).pipeline()
    pipe.tokenizer.add_tokens(["<new>_1"])
    with pytest.raises(ConfigError, match="'<new>_1' is already a token"):
        load_embeddings(pipe, embeddings, load_file(str(embeddings)), token="<new>")


def test_embeddings_load_and_the_manifest_names_the_tokens(tmp_path, capsys, embeddings):
    out = tmp_path / "out"
    assert generate("--embeddings", str(embeddings.parent), out=out) == 0
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["tokens"] == ["<sks-toy>", "<sks-toy>_1"] and manifest["embeddings"] == str(embeddings)


# -- missing, empty, unreadable and pickled files -------------------------------------------------
@pytest.mark.parametrize("option", ["--lora", "--embeddings"])
def test_missing_path_is_refused_without_a_hub_lookup(tmp_path, capsys, option):
    out, missing = tmp_path / "out", tmp_path / "nowhere" / "weights"
    assert_refused(generate(option, str(missing), out=out), capsys, out, option, missing, "does not exist")


@pytest.mark.parametrize("option", ["--lora", "--embeddings"])
def test_empty_folder_is_refused(tmp_path, capsys, option):
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    assert_refused(generate(option, str(empty), out=out), capsys, out, option, empty, "holds no weights")


@pytest.mark.parametrize("option,name", [("--lora", "pytorch_lora_weights.safetensors"),
                                         ("--embeddings", "learned_embeds.safetensors")])
def test_empty_or_damaged_file_is_refused(tmp_path, capsys, option, name):
    for content in (b"", b"\x00" * 64):
        folder = tmp_path / f"bad{len(content)}"
        folder.mkdir()
        (folder / name).write_bytes(content)
        out = tmp_path / "out"
        assert_refused(generate(option, str(folder), out=out), capsys, out, option, folder / name,
                       "not a readable .safetensors file")


def test_pickled_lora_needs_allow_pickle(tmp_path, capsys, loras):
    folder = tmp_path / "pickled"
    folder.mkdir()
    pickled = folder / "pytorch_lora_weights.bin"
    torch.save(load_file(str(loras["sd"] / "pytorch_lora_weights_kohya.safetensors")), pickled)
    out = tmp_path / "out"
    for given in (folder, pickled):  # the folder (diffusers would fall back to the .bin) and the file
        assert_refused(generate("--lora", str(given), out=out), capsys, out, "--lora", pickled, "pickle",
                       "--allow-pickle")
    assert generate("--lora", str(pickled), "--allow-pickle", out=out) == 0
    assert (out / "000.png").is_file()


def test_pickled_embeddings_need_allow_pickle(tmp_path, capsys):
    folder = tmp_path / "ti"
    folder.mkdir()
    torch.save({"<sks-toy>": torch.randn(1, 32)}, folder / "learned_embeds.bin")
    out = tmp_path / "out"
    assert_refused(generate("--embeddings", str(folder), out=out), capsys, out, "--embeddings",
                   folder / "learned_embeds.bin", "--allow-pickle")
    assert generate("--embeddings", str(folder), "--allow-pickle", out=out) == 0


def test_missing_base_names_the_option(tmp_path, capsys):
    out = tmp_path / "out"
    err = assert_refused(generate(base=str(tmp_path / "no-model"), out=out), capsys, out, "--base", "does not exist")
    assert "model.base" not in err


# -- numbers and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["-n", "0"], "-n: must be at least 1"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--resolution", "63"], "--resolution: must be a positive multiple of 8"),
    (["--resolution", "0"], "--resolution"),
    (["--guidance", "nan"], "--guidance"),
    (["--seed", "-1"], "--seed"),
    (["--lora-scale", "0.5"], "--lora-scale: only with --lora"),
    (["--token", "<x>"], "--token: only with --embeddings"),
    (["--device", "cuda:99"], "--device"),
])
def test_bad_numbers_and_options_are_refused_before_anything_loads(tmp_path, capsys, monkeypatch, args, needle):
    import personalize.models

    monkeypatch.setattr(personalize.models, "load_models", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    # generate() passes -n 1 / --steps 1 / --resolution 64 first; argparse keeps the last value given
    assert_refused(generate(*args, out=out), capsys, out, needle)


# -- the output folder -----------------------------------------------------------------------------
def test_unusable_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import personalize.models

    monkeypatch.setattr(personalize.models, "load_models", lambda *a, **k: pytest.fail("the model was loaded"))
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for out in (a_file, a_file / "below"):
        code = generate(out=out)
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and str(a_file) in err and "Traceback" not in err, err
        assert a_file.read_text() == "mine"


def test_out_inside_an_input_is_refused(tmp_path, capsys, loras):
    out = loras["sd"]  # the LoRA's own folder: the images could overwrite it
    before = snapshot(out)
    assert_refused(generate("--lora", str(out), out=out), capsys, out, "--lora", "inside the output folder",
                   before=before)


def test_finished_run_is_replaced_only_with_overwrite_and_only_its_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(out=out, n="3") == 0
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    assert_refused(generate(out=out), capsys, out, "--out", "finished run", "--overwrite", before=before)

    assert generate("--overwrite", out=out, n="1") == 0  # -n 3 then -n 1: no stale 001.png / 002.png
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["000.png", "generate.json", "grid.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["files"] == ["000.png", "grid.png"] and manifest["n"] == 1 and manifest["prompt"] == PROMPT


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_file_generate_did_not_write_is_never_replaced(tmp_path, capsys, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000.png").write_bytes(b"the user's picture")
    before = snapshot(out)
    assert_refused(generate(*overwrite, out=out), capsys, out, "--out", out / "000.png", "not written by",
                   before=before)
