"""``personalize demo``: generate one subject in new scenes with the shipped in-context model (no
training) and after personalizing the shipped toy model with each fine-tuning method, and write a
report that scores base vs each method.

With a held-out toy subject (the default) the toy-world judges score subject and prompt fidelity.
With a folder of the user's own images the same methods run, but the toy model only knows the toy
world: it will render toy-like images, and the toy judges cannot score real photos, so the report
shows the images without scores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from personalize.toyworld.toybench import run_toybench, toybench_rows, toybench_settings
from personalize.toyworld.world import HELDOUT_NAMES, SCENES

DEFAULT_METHODS = ("incontext", "lora", "textual_inversion", "dreambooth")


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_demo(out: Path, subject: Optional[str] = None, methods: tuple[str, ...] = DEFAULT_METHODS, n: int = 1,
             class_noun: str = "star", steps: int = 25) -> dict[str, Path]:
    from personalize.toyworld.model import toy_model_path

    toy_model_path()  # a clear error before any work if the model is missing
    toybench_rows(methods)  # an unknown method is refused before any work
    out.mkdir(parents=True, exist_ok=True)
    if subject is None or subject in HELDOUT_NAMES:
        return _toy_subject_demo(out, subject or HELDOUT_NAMES[0], methods, n, steps)
    folder = Path(subject).expanduser()
    if not folder.is_dir():
        from personalize.data.images import DataError

        raise DataError(f"--subject: {subject} is neither a held-out toy subject "
                        f"({', '.join(HELDOUT_NAMES)}) nor a folder of images")
    return _folder_demo(out, folder, methods, n, class_noun, steps)


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
    from personalize.dreambench import BenchSubject, EvalPrompt
    from personalize.harness import run_benchmark

    _log("your own images with the toy model: it only knows the 64x64 toy world, so expect toy-like "
         "pictures, not photographs; the toy judges cannot score real photos, so the report has no scores")
    paths = check_images(list_images(folder, "--subject"), min_size=32, skip_bad=False, what="--subject")
    refs = out / "your-references"
    shutil.rmtree(refs, ignore_errors=True)
    refs.mkdir(parents=True)
    for i, path in enumerate(paths):
        ImageOps.fit(load_image(path), (64, 64), Image.Resampling.LANCZOS).save(refs / f"{i:02d}.png")
    prompts = [EvalPrompt(i, f"a {{}} {words}", "recontextualization") for i, words in enumerate(list(SCENES.values())[:6])]
    subject = BenchSubject(folder.name, noun, sorted(refs.glob("*.png")), prompts)
    settings = toybench_settings(out, n=n, steps=steps, drift_images=0, title="personalize demo on your images",
                                 keep_weights=True)
    files = run_benchmark([subject], toybench_rows(["base", *methods]), [], settings, log=_log, data=str(folder))
    _log(f"report: {files['markdown']} and {files['html']}")
    return files
