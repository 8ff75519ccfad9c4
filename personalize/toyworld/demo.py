"""``personalize demo``: personalize the shipped toy model to one subject with each fine-tuning method,
generate the subject in new scenes, and write a report that scores base vs each method.

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

from personalize.toyworld.toybench import (
    PLACEHOLDER, TOKEN, generate, personalize_subject, pipeline_for, run_subject, write_report,
)
from personalize.toyworld.world import HELDOUT_NAMES, SCENES, heldout_subjects

DEFAULT_METHODS = ("lora", "textual_inversion", "dreambooth")


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_demo(out: Path, subject: Optional[str] = None, methods: tuple[str, ...] = DEFAULT_METHODS, n: int = 2,
             class_noun: str = "star", steps: int = 25) -> dict[str, Path]:
    from personalize.toyworld.model import toy_model_path

    toy_model_path()  # a clear error before any work if the model is missing
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
    from personalize.toyworld.judge import Judges

    subject = next(s for s in heldout_subjects() if s.name == name)
    _log(f"subject {name}: a {subject.cls} the toy model has never seen; its 4 reference renders are in "
         f"{out / name / 'references'}")
    judges = Judges.load()
    start = time.perf_counter()
    rows = run_subject(judges, subject, ["base", *methods], out / name, n=n, steps=steps, keep_weights=True,
                       log=_log)
    notes = (f"Subject '{name}' (a held-out {subject.cls}), personalized from 4 reference renders; "
             f"{n} images for each of 20 ToyBench prompts. Subject fidelity: identity-embedding cosine to the "
             "references (the ceiling row scores real renders of the subject in each prompt's context); prompt "
             f"fidelity: fraction of images whose class, color, scene and accessory the attribute judge reads "
             f"as asked. Whole demo: {time.perf_counter() - start:.0f} s.")
    files = write_report({name: rows}, out, "personalize demo on the toy world", notes)
    _log(f"report: {files['markdown']} and {files['html']}")
    print(files["markdown"].read_text())
    return files


def _folder_demo(out: Path, folder: Path, methods, n: int, noun: str, steps: int) -> dict[str, Path]:
    from personalize.data.images import check_images, list_images, load_image
    from personalize.toyworld.world import Subject

    _log("your own images with the toy model: it only knows the 64x64 toy world, so expect toy-like "
         "pictures, not photographs; the toy judges cannot score real photos, so the report has no scores")
    paths = check_images(list_images(folder, "--subject"), min_size=32, skip_bad=False, what="--subject")
    refs = out / "references"
    shutil.rmtree(refs, ignore_errors=True)
    refs.mkdir(parents=True)
    for i, path in enumerate(paths):
        ImageOps.fit(load_image(path), (64, 64), Image.Resampling.LANCZOS).save(refs / f"{i:02d}.png")
    user = Subject("yours", noun, "red", (), 1.0, 0.0, ())  # only class noun is used for prompts here
    prompts = [f"a {{}} {words}" for words in list(SCENES.values())[:6]]
    for method in ["base", *methods]:
        run_dir = None
        if method != "base":
            _log(f"training {method} ...")
            run_dir, seconds = personalize_subject(method, user, refs, out / method / "run", out / "class-images")
            _log(f"{method}: trained in {seconds:.0f} s")
        pipe, token = pipeline_for(method, run_dir)
        words = f"{token} {noun}" if token else noun
        images = generate(pipe, [p.format(words) for p in prompts], n, steps=steps)
        (out / method).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(out / method / f"{i:03d}.png")
    from personalize.toyworld.toybench import subject_grid

    grid = subject_grid(out, ["base", *methods], per_row=len(prompts) * n)
    grid.save(out / "grid.png")
    (out / "report.md").write_text(
        f"# personalize demo on your images\n\nRows: references, base, {', '.join(methods)}. Prompts: "
        + "; ".join(p.format(f'[{TOKEN}|{PLACEHOLDER}] {noun}') for p in prompts) + ".\n\n![grid](grid.png)\n")
    _log(f"report: {out / 'report.md'} and {out / 'grid.png'}")
    return {"markdown": out / "report.md", "grid": out / "grid.png"}
