"""``personalize demo``: generate one subject in new scenes with the shipped in-context model (no
training) and after personalizing the shipped toy model with each fine-tuning method, and write a
report that scores base vs each method.

With a held-out toy subject (the default) the toy-world judges score subject and prompt fidelity.
With a folder of the user's own images the same methods run, but the toy model only knows the toy
world: it will render toy-like images, and the toy judges cannot score real photos, so the report
shows the images without scores.

The output folder is claimed like every command's (:class:`~personalize.utils.output_dir.OutputFolder`):
checked and locked before any work, refused when it holds the user's subject folder, and refused when
it holds a finished demo (``demo.json``, written last) unless ``--overwrite``; an interrupted demo
continues where it stopped. Nothing the demo did not write is ever deleted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from personalize.evaluation.toybench import run_toybench, toybench_rows, toybench_settings
from personalize.toyworld.world import HELDOUT_NAMES, SCENES
from personalize.utils.output_dir import OutputFolder

MANIFEST = "demo.json"  # written last: a finished demo
REFERENCES_MANIFEST = "references.json"  # the copies of the user's photos in OUT/your-references

DEFAULT_METHODS = ("incontext", "lora", "textual_inversion", "dreambooth")


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_demo(out: Path, subject: Optional[str] = None, methods: tuple[str, ...] = DEFAULT_METHODS, n: int = 1,
             class_noun: str = "star", steps: int = 25, overwrite: bool = False) -> dict[str, Path]:
    from personalize.models.toy import toy_model_path

    toy_model_path()  # a clear error before any work if the model is missing
    toybench_rows(methods)  # an unknown method is refused before any work
    folder = None
    if subject is not None and subject not in HELDOUT_NAMES:
        folder = Path(subject).expanduser()
        if not folder.is_dir():
            from personalize.data.images import DataError

            raise DataError(f"--subject: {subject} is neither a held-out toy subject "
                            f"({', '.join(HELDOUT_NAMES)}) nor a folder of images")
    output = OutputFolder(out, "--out", finished=MANIFEST, overwrite=overwrite,
                          inputs={"--subject": [folder] if folder else []})
    with output.claim():
        if folder is None:
            files = _toy_subject_demo(out, subject or HELDOUT_NAMES[0], methods, n, steps)
        else:
            files = _folder_demo(out, folder, methods, n, class_noun, steps)
        output.write_manifest(sorted(set(files.values())), subject=subject or HELDOUT_NAMES[0],
                              methods=list(methods), images_per_prompt=n, steps=steps)
    return files


def _toy_subject_demo(out: Path, name: str, methods, n: int, steps: int) -> dict[str, Path]:
    from personalize.toyworld.world import heldout_subjects

    subject = next(s for s in heldout_subjects() if s.name == name)
    _log(f"subject {name}: a {subject.cls} the toy model has never seen; its 4 reference renders are in "
         f"{out / 'toy-subjects' / name}")
    files = run_toybench([name], ["base", *methods, "ceiling"], out, n=n, steps=steps, log=_log, drift_images=0,
                         title="personalize demo on the toy world", keep_weights=True)
    _log(f"report: {files['markdown']}, {files['html']} and {files[f'grid {name}']}")
    print(files["markdown"].read_text())
    return files


def _folder_demo(out: Path, folder: Path, methods, n: int, noun: str, steps: int) -> dict[str, Path]:
    from personalize.data.images import check_images, list_images, load_image
    from personalize.evaluation.subjects import BenchSubject, EvalPrompt
    from personalize.evaluation.harness import run_benchmark

    _log("your own images with the toy model: it only knows the 64x64 toy world, so expect toy-like "
         "pictures, not photographs; the toy judges cannot score real photos, so the report has no scores")
    paths = check_images(list_images(folder, "--subject"), min_size=32, skip_bad=False, what="--subject")
    references = _write_references(out / "your-references", [load_image(p) for p in paths])
    prompts = [EvalPrompt(i, f"a {{}} {words}", "recontextualization") for i, words in enumerate(list(SCENES.values())[:6])]
    subject = BenchSubject(folder.name, noun, references, prompts)
    settings = toybench_settings(out, n=n, steps=steps, drift_images=0, title="personalize demo on your images",
                                 keep_weights=True)
    files = run_benchmark([subject], toybench_rows(["base", *methods]), [], settings, log=_log, data=str(folder))
    _log(f"report: {files['markdown']} and {files['html']}")
    return files


def _write_references(refs: Path, images: list[Image.Image]) -> list[Path]:
    """64x64 copies of the user's photos in ``refs``; the copies an earlier demo wrote (its manifest lists
    them) are replaced, nothing else there is touched; refs made from other photos are refused."""
    from personalize.utils.files import atomic_write_json, save_image

    refs.mkdir(parents=True, exist_ok=True)
    manifest = OutputFolder(refs, "--out", finished=REFERENCES_MANIFEST, overwrite=True)
    manifest.remove_previous()
    unknown = sorted(p.name for p in refs.iterdir() if p.name != REFERENCES_MANIFEST)
    if unknown:
        from personalize.errors import OutputError

        raise OutputError(f"--out: {refs} holds files the demo did not write ({', '.join(unknown[:5])}); "
                          f"move them, or choose another --out")
    written = []
    for i, image in enumerate(images):
        written.append(save_image(ImageOps.fit(image, (64, 64), Image.Resampling.LANCZOS), refs / f"{i:02d}.png"))
    atomic_write_json(refs / REFERENCES_MANIFEST, {"files": [p.name for p in written]})
    return written
