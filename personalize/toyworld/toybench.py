"""ToyBench: DreamBench's protocol in the toy world, with judges that know the ground truth.

For each held-out subject: 4 reference renders (the "photos" a user brings), the prompt templates of
DreamBench's three kinds (recontextualization, accessorization, property modification), a few images
per prompt with fixed seeds. A method personalizes the toy base model on the references with this
project's trainer and a recipe (``recipes/toy/<method>.yaml``), then generates; the judges score
subject fidelity (identity-embedding cosine to the references, like DINO) and prompt fidelity (the
fraction of images that show what the prompt asked). The *ceiling* row scores real renders of the
subject in each prompt's context; the *base* row is the base model prompted with the class noun.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from personalize.toyworld.world import ACCESSORIES, SCENES, ImageSpec, Subject, render, sample_spec

TOKEN = "sks"  # DreamBooth / LoRA: the rare token bound to the subject
PLACEHOLDER = "<toy-subject>"  # Textual Inversion
METHOD_RECIPES = {"dreambooth": "toy/dreambooth", "lora": "toy/lora", "textual_inversion": "toy/textual-inversion"}


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


# -- running a method -----------------------------------------------------------------------------

def personalize_subject(method: str, subject: Subject, references: Path, out_dir: Path, class_images: Path,
                        overrides: tuple[str, ...] = ()) -> tuple[Path, float]:
    """Train ``method`` on the references with its toy recipe; return (output folder, seconds)."""
    from personalize.cli import resolve_recipe
    from personalize.config import load_config
    from personalize.trainer import Trainer

    recipe = METHOD_RECIPES[method]
    prompt = f"a {PLACEHOLDER}" if method == "textual_inversion" else f"a {TOKEN} {subject.cls}"
    settings = [f"data.instance_images={references}", f"data.instance_prompt={prompt}",
                f"train.output_dir={out_dir}", "train.report_to=none", "validation.prompts=[]"]
    if method == "textual_inversion":
        settings.append(f"textual_inversion.initializer_token={subject.cls}")
    else:
        settings += [f"prior.class_prompt=a {subject.cls}", f"prior.class_images={class_images / subject.cls}"]
    config = load_config(resolve_recipe(recipe), [*settings, *overrides])
    if method != "textual_inversion" and not config.prior.enabled:
        config.prior.class_images = None
    start = time.perf_counter()
    Trainer(config).train()
    return out_dir, time.perf_counter() - start


def pipeline_for(method: str, out_dir: Optional[Path], base: str = "toy"):
    from personalize.generate import build_pipeline

    if method == "base":
        return build_pipeline(base), ""
    if method == "dreambooth":
        return build_pipeline(str(out_dir)), TOKEN
    if method == "lora":
        return build_pipeline(base, lora=str(out_dir)), TOKEN
    return build_pipeline(base, embeddings=str(out_dir), token=PLACEHOLDER), PLACEHOLDER


def generate(pipe, prompts: list[str], n: int, seed: int = 0, steps: int = 25, guidance: float = 4.0,
             batch_size: int = 40) -> list[np.ndarray]:
    """``n`` images per prompt, image j with seed ``seed + j`` (the same seeds for every method)."""
    import torch

    jobs = [(prompt, seed + j) for prompt in prompts for j in range(n)]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                   generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="np").images
        images += [np.clip(np.rint(o * 255), 0, 255).astype(np.uint8) for o in out]
    return images


# -- scoring --------------------------------------------------------------------------------------

def score(judges, subject: Subject, prompts: list[BenchPrompt], images: list[np.ndarray], references: np.ndarray,
          n: int, seed: int = 0) -> dict:
    """Subject and prompt fidelity overall and per prompt kind (``n`` images per prompt, in order)."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        batch = np.stack(images[i * n:(i + 1) * n])
        asked = [prompt.spec(subject, seed + j) for j in range(n)]
        per_prompt.append({"prompt": prompt.template, "kind": prompt.kind,
                           "subject_fidelity": float(judges.subject_fidelity(batch, references)),
                           "prompt_fidelity": float(judges.prompt_fidelity(batch, asked))})
    out = {"subject_fidelity": float(np.mean([p["subject_fidelity"] for p in per_prompt])),
           "prompt_fidelity": float(np.mean([p["prompt_fidelity"] for p in per_prompt])), "per_prompt": per_prompt}
    for kind in ("recontextualization", "accessorization", "property"):
        rows = [p for p in per_prompt if p["kind"] == kind]
        out[kind] = {k: float(np.mean([p[k] for p in rows])) for k in ("subject_fidelity", "prompt_fidelity")}
    return out


def ceiling_images(subject: Subject, prompts: list[BenchPrompt], n: int, seed: int = 0) -> list[np.ndarray]:
    return [render(p.spec(subject, seed + j)) for p in prompts for j in range(n)]


def language_drift(judges, pipe, subject: Subject, references: np.ndarray, n: int = 8, seed: int = 100) -> dict:
    """The class prompt "a {class}" after personalization: similarity of its images to the subject
    (high = the class collapsed onto the subject) and to each other (high = little diversity)."""
    images = np.stack(generate(pipe, [f"a {subject.cls}"], n, seed=seed))
    import torch

    emb = torch.as_tensor(judges.embed(images)).float().cpu().numpy()
    pairwise = (emb @ emb.T)[~np.eye(len(emb), dtype=bool)].mean()
    return {"class_prompt_subject_similarity": float(judges.subject_fidelity(images, references)),
            "class_prompt_self_similarity": float(pairwise)}


# -- the benchmark --------------------------------------------------------------------------------

def run_subject(judges, subject: Subject, methods: list[str], out_dir: Path, n: int = 2, steps: int = 25,
                guidance: float = 4.0, overrides: Optional[dict[str, tuple[str, ...]]] = None,
                drift: bool = False, keep_weights: bool = False, log: Callable[[str], None] = print) -> dict:
    """Every row for one subject; images and per-method results are written under ``out_dir``."""
    prompts = toybench_prompts(subject)
    references = np.stack([render(s) for s in reference_specs(subject)])
    refs_dir = out_dir / "references"
    write_references(subject, refs_dir)
    rows: dict[str, dict] = {"ceiling": score(judges, subject, prompts, ceiling_images(subject, prompts, n),
                                              references, n)}
    grids = {"references": list(references)}
    for method in methods:
        result_file = out_dir / method / "result.json"
        if result_file.is_file():  # finished earlier: a rerun skips it
            rows[method] = json.loads(result_file.read_text())
            log(f"{subject.name}: {method} already done")
            continue
        train_seconds, run_dir = 0.0, None
        if method != "base":
            log(f"{subject.name}: training {method} ...")
            name = method.removesuffix("_no_prior")
            extra = ("prior.enabled=false",) if method.endswith("_no_prior") else ()
            run_dir = out_dir / method / "run"
            shutil.rmtree(run_dir, ignore_errors=True)
            _, train_seconds = personalize_subject(name, subject, refs_dir, run_dir, out_dir.parent / "class-images",
                                                   (*extra, *(overrides or {}).get(name, ())))
        pipe, token = pipeline_for(method.removesuffix("_no_prior"), run_dir)
        words = f"{token} {subject.cls}" if token else subject.cls
        start = time.perf_counter()
        images = generate(pipe, [p.text(words) for p in prompts], n, steps=steps, guidance=guidance)
        result = score(judges, subject, prompts, images, references, n)
        result.update(train_seconds=train_seconds, generate_seconds=time.perf_counter() - start)
        if drift and method != "base":
            result["drift"] = language_drift(judges, pipe, subject, references)
        (out_dir / method).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(out_dir / method / f"{i:03d}.png")
        if run_dir and not keep_weights:
            shutil.rmtree(run_dir, ignore_errors=True)
        result_file.write_text(json.dumps(result, indent=2))
        rows[method] = result
        log(f"{subject.name}: {method} subject fidelity {result['subject_fidelity']:.3f}, "
            f"prompt fidelity {result['prompt_fidelity']:.3f}")
    return rows


# -- reports --------------------------------------------------------------------------------------

ROW_ORDER = ("ceiling", "dreambooth", "dreambooth_no_prior", "lora", "textual_inversion", "base")
KINDS = ("recontextualization", "accessorization", "property")


def mean_rows(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Average each method's figures over subjects: results[subject][method] -> table[method]."""
    methods = [m for m in ROW_ORDER if any(m in rows for rows in results.values())]
    table = {}
    for method in methods:
        rows = [r[method] for r in results.values() if method in r]
        entry = {k: float(np.mean([r[k] for r in rows])) for k in ("subject_fidelity", "prompt_fidelity")}
        for kind in KINDS:
            entry[kind] = {k: float(np.mean([r[kind][k] for r in rows])) for k in ("subject_fidelity", "prompt_fidelity")}
        for key in ("train_seconds", "generate_seconds"):
            if all(key in r for r in rows):
                entry[key] = float(np.mean([r[key] for r in rows]))
        drifts = [r["drift"] for r in rows if "drift" in r]
        if drifts:
            entry["drift"] = {k: float(np.mean([d[k] for d in drifts])) for k in drifts[0]}
        entry["subjects"] = len(rows)
        table[method] = entry
    return table


def markdown_table(table: dict[str, dict]) -> str:
    head = ("| row | subject fidelity | prompt fidelity | " +
            " | ".join(f"{k[:7]}. subj / prompt" for k in KINDS) + " | train s | generate s |")
    lines = [head, "|---|---:|---:|" + "---:|" * len(KINDS) + "---:|---:|"]
    for method, e in table.items():
        kinds = " | ".join(f"{e[k]['subject_fidelity']:.3f} / {e[k]['prompt_fidelity']:.2f}" for k in KINDS)
        times = " | ".join(f"{e[k]:.0f}" if k in e else "–" for k in ("train_seconds", "generate_seconds"))
        lines.append(f"| {method} | {e['subject_fidelity']:.3f} | {e['prompt_fidelity']:.3f} | {kinds} | {times} |")
    drift = [(m, e["drift"]) for m, e in table.items() if "drift" in e]
    if drift:
        lines += ["", "Language drift: images of the bare class prompt \"a {class}\" after personalization "
                  "(identity-embedding cosine to the subject's references, and among themselves; lower = less drift, "
                  "more diverse).", "", "| row | to the subject | among themselves |", "|---|---:|---:|"]
        lines += [f"| {m} | {d['class_prompt_subject_similarity']:.3f} | {d['class_prompt_self_similarity']:.3f} |"
                  for m, d in drift]
    return "\n".join(lines)


def subject_grid(subject_dir: Path, methods: list[str], per_row: int = 10) -> Image.Image:
    """References on top, then the first ``per_row`` images of each method, one row each."""
    rows = [sorted((subject_dir / "references").glob("*.png"))]
    rows += [sorted((subject_dir / m).glob("[0-9]*.png"))[:per_row] for m in methods if (subject_dir / m).is_dir()]
    grid = Image.new("RGB", (64 * per_row, 64 * len(rows)), "white")
    for r, paths in enumerate(rows):
        for c, path in enumerate(paths[:per_row]):
            grid.paste(Image.open(path).convert("RGB"), (64 * c, 64 * r))
    return grid


def write_report(results: dict[str, dict[str, dict]], out_dir: Path, title: str, notes: str = "") -> dict[str, Path]:
    """results.json, report.md (the table) and report.html (table + image grids) in ``out_dir``."""
    import html

    table = mean_rows(results)
    (out_dir / "results.json").write_text(json.dumps({"table": table, "subjects": results}, indent=2))
    md = f"# {title}\n\n{notes}\n\n{markdown_table(table)}\n"
    (out_dir / "report.md").write_text(md)
    parts = [f"<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p><pre>{html.escape(markdown_table(table))}</pre>"]
    for subject in results:
        methods = [m for m in ROW_ORDER if m in results[subject] and m != "ceiling"]
        grid = subject_grid(out_dir / subject, methods)
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out_dir / subject / "grid.png")
        labels = ", ".join(["references", *methods])
        parts.append(f"<h2>{html.escape(subject)}</h2><p>rows: {html.escape(labels)}</p>"
                     f"<img src='{html.escape(subject)}/grid.png' style='image-rendering:pixelated'>")
    (out_dir / "report.html").write_text("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) +
                                         "</title><body style='font-family:sans-serif'>" + "".join(parts) + "</body>")
    return {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}


def run_toybench(subjects: list[str], methods: list[str], out: Path, n: int = 2, steps: int = 25,
                 doc: Optional[Path] = None, command: str = "python eval/toybench.py") -> dict[str, Path]:
    """Run ``methods`` on the held-out ``subjects``; write the report (and ``doc``, the markdown table)."""
    from personalize.toyworld.judge import Judges
    from personalize.toyworld.world import heldout_subjects

    judges = Judges.load()
    by_name = {s.name: s for s in heldout_subjects()}
    results = {}
    start = time.perf_counter()
    for name in subjects:
        results[name] = run_subject(judges, by_name[name], methods, out / name, n=n, steps=steps,
                                    drift=True)
    notes = (f"Held-out subjects: {', '.join(subjects)}; 20 prompts x {n} images, {steps} DDIM steps, guidance "
             f"4.0, fixed seeds; methods trained with recipes/toy/*.yaml on 4 reference renders. Produced by "
             f"`{command}` in {(time.perf_counter() - start) / 60:.1f} min (CPU, 2 cores; finished rows of an "
             f"earlier run are reused).")
    files = write_report(results, out, "ToyBench", notes)
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(files["markdown"].read_text())
    print(files["markdown"].read_text())
    return files
