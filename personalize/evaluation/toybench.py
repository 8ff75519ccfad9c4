"""ToyBench: DreamBench's protocol in the toy world, with judges that know the ground truth.

For each held-out subject: 4 reference renders (the "photos" a user brings), the prompt templates of
DreamBench's three kinds (recontextualization, accessorization, property modification), a few images
per prompt with fixed seeds. It runs on the evaluation harness (:mod:`personalize.evaluation.harness`) like
DreamBench: a method personalizes the toy base model on the references with this project's trainer and
a recipe (``recipes/toy/<method>.yaml``), then generates; the judges
(:class:`personalize.metrics.toy.ToyJudgeMetrics`) score subject fidelity (identity-embedding cosine to the
references, like DINO) and prompt fidelity (the fraction of images that show what the prompt asked).
The *ceiling* row scores real renders of the subject in each prompt's context; the *base* row is the
base model prompted with the class noun.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from personalize.errors import ConfigError, DataError
from personalize.evaluation.subjects import BenchSubject, EvalPrompt, select_prompts
from personalize.toyworld.world import ACCESSORIES, SCENES, ImageSpec, Subject, render, sample_spec

TOKEN = "sks"  # DreamBooth / LoRA: the rare token bound to the subject
PLACEHOLDER = "<toy-subject>"  # Textual Inversion
METHOD_RECIPES = {"dreambooth": "toy/dreambooth", "lora": "toy/lora", "textual_inversion": "toy/textual-inversion"}
ROWS = ("base", "textual_inversion", "lora", "dreambooth", "dreambooth_no_prior", "ceiling")


@dataclass(frozen=True)
class BenchPrompt:
    """One template: ``template.format(words)`` where words is e.g. "sks star" or "star"."""
    template: str
    kind: str  # recontextualization | accessorization | property
    scene: Optional[str] = None
    accessory: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None

    def text(self, words: str) -> str:
        return self.template.format(words).replace("a orange", "an orange")

    def spec(self, subject: Subject, seed: int) -> ImageSpec:
        """A real render of ``subject`` that shows what this prompt asks (the ceiling row)."""
        rng = np.random.default_rng([5, seed])
        spec = sample_spec(rng, subject, scene=self.scene, accessory=self.accessory, color=self.color,
                           size=self.size or "normal")
        return spec


def toybench_prompts(subject: Subject) -> list[BenchPrompt]:
    """DreamBench's kinds transposed to the toy world: 9 + 5 + 6 = 20 templates."""
    prompts = [BenchPrompt(f"a {{}} {words}", "recontextualization", scene=scene) for scene, words in SCENES.items()]
    prompts += [BenchPrompt(f"a {{}} wearing {words}", "accessorization", accessory=accessory)
                for accessory, words in ACCESSORIES.items()]
    colors = [c for c in ("purple", "red", "blue", "green", "yellow") if c != subject.color][:4]
    prompts += [BenchPrompt(f"a {color} {{}}", "property", color=color) for color in colors]
    prompts += [BenchPrompt("a big {}", "property", size="big"), BenchPrompt("a small {}", "property", size="small")]
    return prompts


def reference_specs(subject: Subject, n: int = 4) -> list[ImageSpec]:
    """The subject's reference renders: its own color, plain or varied scenes, no accessory."""
    rng = np.random.default_rng([4, sum(map(ord, subject.name))])
    scenes = [None, "wooden floor", "grass", "city", "beach", "snow"]
    return [sample_spec(rng, subject, scene=scenes[i % len(scenes)], accessory=None, size="normal")
            for i in range(n)]


def write_references(subject: Subject, folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(reference_specs(subject, n)):
        path = folder / f"{i:02d}.png"
        Image.fromarray(render(spec)).save(path)
        paths.append(path)
    return paths


# -- the benchmark, on the evaluation harness ----------------------------------------------------

def toybench_rows(rows: Sequence[str], base: str = "toy") -> list:
    """Harness rows by ToyBench name: ``base``, a fine-tuning method of :data:`METHOD_RECIPES`,
    ``dreambooth_no_prior`` (DreamBooth without prior preservation), ``ceiling`` (real renders) and
    ``incontext[_LABEL][:FOLDER]`` (an in-context model; default: the shipped toy one)."""
    from personalize.evaluation.rows import BaseModelRow, FineTuneRow, InContextRow, ToyRendersRow

    unknown = [r for r in rows if r not in ROWS and not r.startswith("incontext")]
    if unknown:
        raise ConfigError(f"unknown ToyBench rows {', '.join(unknown)}; choose from {', '.join(ROWS)}, "
                         "incontext[_LABEL][:FOLDER]")
    out = []
    for name in rows:
        if name.startswith("incontext"):
            from personalize.incontext.shipped import default_model

            label, _, folder = name.partition(":")
            out.append(InContextRow(base, label, folder or str(default_model())))
        elif name == "base":
            out.append(BaseModelRow(base))
        elif name == "ceiling":
            out.append(ToyRendersRow(base, "ceiling"))
        elif name == "dreambooth_no_prior":
            out.append(FineTuneRow(METHOD_RECIPES["dreambooth"], [f"model.base={base}", "prior.enabled=false"], name))
        else:
            out.append(FineTuneRow(METHOD_RECIPES[name], [f"model.base={base}"], name))
    return out


def toybench_settings(out: Path, n: int = 2, steps: int = 25, guidance: float = 6.0, drift_images: int = 8,
                      title: str = "ToyBench", keep_weights: bool = False, caption_references: bool = True,
                      ref_guidance: Optional[float] = None, bf16: bool = False, references: int = 0,
                      ref_interval=None):
    """ToyBench's settings: 25 DDIM steps at guidance 6, fine-tuning rows trained on captioned references
    ("a sks ring on the grass"; without captions DreamBooth learns the references' backgrounds as part of
    the subject). DreamBooth on zorbo: uncaptioned, guidance 4: subject / prompt fidelity 0.443 / 0.700;
    captioned, guidance 4: 0.502 / 0.725; captioned, guidance 6: 0.475 / 0.800. In-context rows: each
    model's own reference guidance (the ``ref_scale`` it was shipped with, chosen on validation subjects:
    6 for toy-incontext-self, 4 for toy-incontext) unless ``ref_guidance`` is given."""
    from personalize.evaluation.settings import EvalSettings

    return EvalSettings(out=str(out), images_per_prompt=n, steps=steps, guidance=guidance, batch_size=40,
                        token=TOKEN, drift_images=drift_images, title=title, keep_weights=keep_weights,
                        caption_references=caption_references, ref_guidance=ref_guidance, bf16=bf16,
                        references=references, ref_interval=ref_interval)


def run_toybench(subjects: Sequence[str], rows: Sequence[str], out: Path, n: int = 2, steps: int = 25,
                 doc: Optional[Path] = None, command: str = "python eval/toybench.py", log=print,
                 **settings) -> dict[str, Path]:
    """Run ``rows`` on the held-out ``subjects`` with the harness; write its report (and ``doc``: the
    markdown report under a line naming ``command`` and the wall-clock time)."""
    import time

    from personalize.evaluation.harness import check_out, run_benchmark
    from personalize.metrics.toy import ToyJudgeMetrics

    start = time.perf_counter()
    eval_settings = toybench_settings(out, n=n, steps=steps, **settings).check()
    check_out(out)
    find_toy_subjects(list(subjects))
    bench_rows, metrics = toybench_rows(rows), [ToyJudgeMetrics.load()]  # all refused before anything is written
    bench_subjects = toy_subjects(list(subjects), out / "toy-subjects")
    files = run_benchmark(bench_subjects, bench_rows, metrics, eval_settings, log=log, data="toy world")
    if doc is not None:
        write_doc(files, doc, command, (time.perf_counter() - start) / 60, out)
    return files


def write_doc(files: dict[str, Path], doc: Path, command: str, minutes: float, out: Path) -> Path:
    """The markdown report as ``doc``, its image grids copied to ``doc``'s folder ``<doc stem>/``, and a
    line naming ``command`` and its wall-clock minutes."""
    import shutil

    grids = doc.parent / doc.stem
    grids.mkdir(parents=True, exist_ok=True)
    for key, path in files.items():
        if key.startswith("grid "):
            shutil.copyfile(path, grids / path.name)
    report = files["markdown"].read_text().replace("](grids/", f"]({doc.stem}/")
    doc.write_text(report + f"\nProduced by `{command}` in {minutes:.1f} min (CPU, 2 cores; rows that earlier runs "
                   "into the same folder finished are reused, and the table gives each row's own train and generate "
                   f"seconds). Images and the HTML report: `{out}/report.html`.\n")
    return doc


# -- ToyBench's subjects -----------------------------------------------------------------------------

def find_toy_subjects(names: Sequence[str], prompt_indices: Optional[Sequence[int]] = None) -> list:
    """The toy-world subjects (``personalize.toyworld.Subject``) named: held-out ones or validation ones
    (``val-N``); unknown names (``--toy``) and prompt indices (``--prompts``) are refused, nothing is written."""
    from personalize.toyworld.world import heldout_subjects, is_validation_name, validation_subject

    if not names:
        raise DataError("--toy: name at least one toy subject (such as zorbo), or 'all'")
    by_name = {s.name: s for s in heldout_subjects()}
    by_name.update({n: validation_subject(n) for n in names if is_validation_name(n)})
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DataError(f"--toy: unknown toy subjects {', '.join(unknown)}; held-out subjects: "
                        f"{', '.join(s.name for s in heldout_subjects())}; validation subjects: val-0, val-1, ...")
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise DataError(f"--toy: {', '.join(twice)} named more than once")
    found = [by_name[n] for n in names]
    for subject in found:
        select_prompts([p.template for p in toybench_prompts(subject)], prompt_indices)
    return found


def toy_subjects(names: Sequence[str], folder: str | Path, prompt_indices: Optional[Sequence[int]] = None,
                 n_references: int = 4) -> list[BenchSubject]:
    """Held-out toy-world subjects (or validation subjects ``val-N``, for choosing settings) as benchmark
    subjects: their reference renders are written to ``folder/<name>/`` and their prompts are ToyBench's
    (same kinds as DreamBench)."""
    from personalize.toyworld.world import caption

    found = find_toy_subjects(names, prompt_indices)
    out = []
    for name, subject in zip(names, found):
        toy_prompts = toybench_prompts(subject)
        prompts = [EvalPrompt(p.index, p.template, p.kind, toy_prompts[p.index])
                   for p in select_prompts([t.template for t in toy_prompts], prompt_indices)]
        references = write_references(subject, Path(folder) / name, n_references)
        captions = [caption(spec) for spec in reference_specs(subject, n_references)]
        out.append(BenchSubject(name, subject.cls, references, prompts, toy=subject, reference_captions=captions))
    return out
