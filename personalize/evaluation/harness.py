"""The evaluation harness: run each row (:mod:`personalize.evaluation.rows`) on benchmark subjects, score the
images with :class:`~personalize.metrics.SubjectMetrics`, write the report (:mod:`personalize.evaluation.report`).

For each subject and row: ``len(prompts) x images_per_prompt`` images, image ``j`` of every prompt
with seed ``seed + j`` (the same seeds for every row), scored by each metric. Per (row, subject) the
harness records training and generation seconds and peak memory and writes
``<out>/<row>/<subject>/result.json`` last, with ``made_with``: everything its numbers depend on (the
row's settings and recipe or model, the prompts, the subject's photos, the metrics). A rerun skips a
result made with what it would use now, and makes one made otherwise again, logging what changed (the
harness replaces only its own files: that result's images and the row's training folder). A subject
whose training finished with the same settings but whose generation did not is not trained again
(``train.resume=auto`` continues a stopped training from its checkpoint). Several processes
(``accelerate launch --num_processes K``) share the subjects round robin; each trains alone on its own
GPU, and each rewrites the report from the result files when it is done, so the last one to finish
writes the whole table.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers.training_utils import free_memory

from personalize.errors import OutputError
from personalize.metrics import SubjectMetrics, copy_paste_rate, metric_names
from personalize.evaluation.records import PeakMemory, as_json, changes, file_digests, read_json, write_json
from personalize.evaluation.rows import Log, Row
from personalize.evaluation.settings import EvalSettings
from personalize.evaluation.subjects import BenchSubject, LaunchState, shard
from personalize.utils.files import save_image

logger = logging.getLogger("personalize.eval")


# -- one subject ----------------------------------------------------------------------------------

def references_made_with(subject: BenchSubject, metrics: Sequence[SubjectMetrics], thumbnail: int) -> dict:
    """What the real-images row of a subject depends on: its photos, the metrics, the thumbnail size."""
    return as_json({"metrics": [m.describe() for m in metrics], "thumbnail": thumbnail,
                    "references": file_digests(subject.references)})


def result_made_with(row: Row, subject: BenchSubject, metrics: Sequence[SubjectMetrics],
                     settings: EvalSettings) -> dict:
    """Everything the numbers of (``row``, ``subject``) depend on; ``prompt_templates`` and ``references``
    are the subject's own, the rest is the same for every subject of a row (:mod:`personalize.evaluation.report`
    groups results by it)."""
    return as_json({"row": row.made_with(settings), "prompts": [p.index for p in subject.prompts],
                    "metrics": [m.describe() for m in metrics],
                    "prompt_templates": [p.template for p in subject.prompts],
                    "references": file_digests(subject.references)})


def _earlier(result_file: Path, made_with: dict, what: str, log: Log) -> tuple[Optional[dict], Optional[dict]]:
    """(the earlier result if it was made with ``made_with``, else None; the earlier result made otherwise,
    whose result file is then removed: until it is made again the pair is pending, not stale)."""
    if not result_file.is_file():
        return None, None
    earlier = read_json(result_file)
    if earlier is not None and earlier.get("made_with") == made_with:
        return earlier, None
    why = "; ".join(changes(earlier.get("made_with"), made_with)) if earlier is not None else "unreadable"
    log(f"{what}: made earlier with other settings ({why}); making it again")
    result_file.unlink()
    return None, earlier


def _remove_listed(earlier: Optional[dict], keep: Sequence[str], folder: Path, out: Path, files) -> None:
    """Remove the files ``earlier`` (a result this harness wrote) listed that the new result does not: only
    regular files inside ``folder``."""
    if not earlier:
        return
    for name in files(earlier):
        path = out / str(name)
        if name not in keep and path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(
                folder.resolve()):
            path.unlink()


def prepare_references(subject: BenchSubject, metrics: Sequence[SubjectMetrics], settings: EvalSettings,
                       thumbnail: int = 256, log: Log = logger.info) -> dict:
    """Thumbnails for the report and the real-images row (references against each other), once per
    photos and metrics."""
    from personalize.metrics import as_pil

    folder = settings.out_dir / "references" / subject.slug
    result_file = folder / "result.json"
    made_with = references_made_with(subject, metrics, thumbnail)
    done, stale = _earlier(result_file, made_with, f"{subject.name}: references", log)
    if done is not None:
        return done
    images = [as_pil(p) for p in subject.references]
    thumbs = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        small = image.copy()
        small.thumbnail((thumbnail, thumbnail))
        thumbs.append(save_image(small, folder / f"{i:02d}.jpg").relative_to(settings.out_dir).as_posix())
    scores = {m.image_metric: m.reference_similarity(images) for m in metrics if m.image_metric and len(images) > 1}
    result = {"subject": subject.name, "class": subject.class_noun, "live": subject.live,
              "references": [str(p) for p in subject.references], "thumbnails": thumbs, "scores": scores,
              "made_with": made_with}
    write_json(result_file, result)
    _remove_listed(stale, thumbs, folder, settings.out_dir, lambda r: r.get("thumbnails", []))
    return result


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def summarize_prompts(per_prompt: list[dict], names: Sequence[str]) -> dict:
    """Means over a subject's prompts: overall and per kind (kinds without prompts are left out)."""
    from personalize.evaluation.subjects import KINDS

    out = {"mean": {k: _mean([p["scores"][k] for p in per_prompt]) for k in names}, "kinds": {}}
    for kind in KINDS:
        rows = [p for p in per_prompt if p["kind"] == kind]
        if rows:
            out["kinds"][kind] = {k: _mean([p["scores"][k] for p in rows]) for k in names}
            out["kinds"][kind]["prompts"] = len(rows)
    return out


def evaluate_subject(row: Row, subject: BenchSubject, metrics: Sequence[SubjectMetrics], settings: EvalSettings,
                     log: Log = logger.info) -> dict:
    """Personalize (if the row does), generate, score and record one subject; skip it if done earlier
    with the same ``made_with`` (:func:`result_made_with`), make it again if done otherwise."""
    from personalize.metrics import as_pil

    work_dir = settings.out_dir / row.label / subject.slug
    result_file = work_dir / "result.json"
    made_with = result_made_with(row, subject, metrics, settings)
    done, stale = _earlier(result_file, made_with, f"{subject.name}: {row.label}", log)
    if done is not None:
        log(f"{subject.name}: {row.label}: done earlier with these settings, skipped")
        return done
    device = settings.torch_device()
    stats = row.prepare(subject, work_dir, settings, log)
    log(f"{subject.name}: {row.label}: generating {len(subject.prompts)} prompts x {settings.images_per_prompt} ...")
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        texts, images = row.generate(subject, work_dir, settings)
    generate_seconds = time.perf_counter() - start
    free_memory()
    references = [as_pil(p) for p in subject.references]
    per_prompt = []
    for prompt, text, group in zip(subject.prompts, texts, images):
        paths = []
        (work_dir / "images").mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(group):
            path = save_image(as_pil(image), work_dir / "images" / f"p{prompt.index:02d}-{j}.png")
            paths.append(path.relative_to(settings.out_dir).as_posix())
        metric_prompt = prompt.text(subject.class_noun)  # the class noun, never the unique token
        scores = {}
        for metric in metrics:
            scores.update(metric.score(group, references, metric_prompt))
        per_prompt.append({"index": prompt.index, "template": prompt.template, "kind": prompt.kind, "prompt": text,
                           "metric_prompt": metric_prompt, "images": paths, "scores": scores})
    names = metric_names(metrics)
    copy_paste = copy_paste_rate([im for group in images for im in group], references)
    drift = language_drift(row, subject, work_dir, settings, metrics, references) if settings.drift_images else None
    result = {"subject": subject.name, "class": subject.class_noun, "row": row.label, **row.describe(),
              **summarize_prompts(per_prompt, names), "prompts": per_prompt,
              "train_seconds": stats.get("train_seconds"), "generate_seconds": generate_seconds,
              "peak_memory_train_mib": stats.get("peak_memory_train_mib"), "peak_memory_generate_mib": peak.mib,
              "memory": peak.kind, "device": str(device), "stats": stats, "copy_paste_rate": copy_paste,
              **({"drift": drift} if drift else {}), "made_with": made_with}
    write_json(result_file, result)
    _remove_listed(stale, [p for q in per_prompt for p in q["images"]], work_dir / "images", settings.out_dir,
                   lambda r: [p for q in r.get("prompts", []) if isinstance(q, dict) for p in q.get("images", [])])
    row.cleanup(work_dir, settings)
    log(f"{subject.name}: {row.label}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["mean"].items()))
    return result


DRIFT_SEED_OFFSET = 1000  # the class-prompt images use seeds apart from the benchmark prompts' seeds


def language_drift(row: Row, subject: BenchSubject, work_dir: Path, settings: EvalSettings,
                   metrics: Sequence[SubjectMetrics], references: Sequence) -> Optional[dict]:
    """DreamBooth's language drift: after personalization, does the bare class prompt "a {class}" still
    give diverse instances of the class, or the subject? Per image metric: the similarity of
    ``settings.drift_images`` class-prompt images to the subject's references (high: the class collapsed
    onto the subject) and among themselves (high: little diversity). None for rows without a class prompt."""
    images = row.class_prompt_images(subject, work_dir, replace(settings, seed=settings.seed + DRIFT_SEED_OFFSET))
    if images is None:
        return None
    return {m.image_metric: {"to_subject": m.image_similarity(images, references),
                             "among_themselves": m.reference_similarity(images)}
            for m in metrics if m.image_metric}


# -- the benchmark --------------------------------------------------------------------------------

def detach_from_launcher(state: LaunchState) -> None:
    """Let this launched process train alone on its own GPU: forget the process group the launcher
    described (the trainer would otherwise join every process into one data-parallel run) and keep only
    the GPU of this process's local rank visible."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(key, None)
    if torch.cuda.is_initialized():
        torch.cuda.set_device(state.local_process_index)
    else:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible or torch.cuda.device_count() > 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = (visible[state.local_process_index % len(visible)] if visible
                                                  else str(state.local_process_index))


def launch_state() -> LaunchState:
    """This process's place in a launch (``accelerate launch`` / ``torchrun``), detached from the launch's
    process group; call it before anything touches CUDA."""
    state = LaunchState.from_environment()
    if state.num_processes > 1:
        detach_from_launcher(state)
    return state


HARNESS_FILES = ("plan.json", "results.json", "report.md", "report.html")


def check_out(out: str | Path, option: str = "--out") -> Path:
    """``out`` can take the harness's files: a writable folder (or one that can be made) that is empty,
    new, or holds an earlier run of the harness (its ``plan.json``); a folder holding a ``results.json``
    or a report without a plan holds files this harness did not write, and is refused."""
    from personalize.utils.output_dir import check_writable

    out = check_writable(out, option)
    plan = out / HARNESS_FILES[0]
    if plan.exists():
        earlier = read_json(plan) if plan.is_file() else None
        if earlier is None or not {"rows", "subjects", "metrics"} <= set(earlier):
            raise OutputError(f"{option}: {plan} was not written by personalize eval; choose another {option}")
    else:
        foreign = [name for name in HARNESS_FILES[1:] if (out / name).exists()]
        if foreign:
            raise OutputError(f"{option}: {out} holds {', '.join(foreign)} but no plan.json: files personalize eval "
                              f"did not write, which it would overwrite; choose another {option}")
    return out


def run_benchmark(subjects: Sequence[BenchSubject], rows: Sequence[Row], metrics: Sequence[SubjectMetrics],
                  settings: EvalSettings, state=None, log: Log = logger.info, data: str = "") -> dict[str, Path]:
    """Evaluate every row on this process's share of ``subjects``; write the report files."""
    from personalize.evaluation.report import write_report

    settings.check()
    for row in rows:
        row.check(subjects)
    if state is None:
        state = launch_state()
    out = check_out(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"title": settings.title, "data": data, "settings": asdict(settings),
            "subjects": [{"name": s.name, "slug": s.slug, "class": s.class_noun, "live": s.live,
                          "prompts": len(s.prompts)} for s in subjects],
            "rows": [r.describe() for r in rows], "metrics": metric_names(metrics)}
    write_json(out / "plan.json", plan)
    mine = shard(subjects, state)
    if state.num_processes > 1:  # processes would write the same class-image files at once
        settings = replace(settings, class_images_suffix=f"-rank{state.process_index}")
        log(f"process {state.process_index} of {state.num_processes}: subjects {', '.join(s.name for s in mine)}")
    for subject in mine:
        prepare_references(subject, metrics, settings, log=log)
        for row in rows:
            evaluate_subject(row, subject, metrics, settings, log)
    return write_report(out)
