"""SuTI's data recipe (Chen et al. 2023, "apprenticeship learning"): for each cluster of images of one
subject, train an *expert* (LoRA DreamBooth with this project's trainer and a recipe), let it generate
the subject for new prompts, score every generated image for subject fidelity (against the cluster's
images) and prompt fidelity, keep the best fraction, and write an in-context manifest in which the
cluster's own images are the examples and the kept generations are the targets.

Resumable: each finished cluster leaves ``clusters/<cluster>/result.json`` (a rerun skips it), and an
expert whose training finished is not trained again (a stopped training resumes from its checkpoint).
The output manifest is rewritten from the finished clusters at the end of every run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from personalize.data.clusters import ClusterRecord, read_manifest, write_manifest
from personalize.data.images import DataError
from personalize.evaluation.records import slug

DEFAULT_TEMPLATES = ("a {} in the snow", "a {} on the beach", "a {} in the jungle", "a {} in the city",
                     "a {} on a wooden floor", "a {} at night", "a {} wearing a red hat", "a {} wearing a rainbow scarf")


@dataclass
class ApprenticeshipSettings:
    out: str = "outputs/apprenticeship"
    expert_recipe: str = "toy/lora"
    base: Optional[str] = None  # replaces the recipe's model.base
    templates: Sequence[str] = DEFAULT_TEMPLATES  # "{}" stands for the subject's words
    images_per_prompt: int = 2
    keep_fraction: float = 0.25
    steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    class_noun: Optional[str] = None  # for records without a "class"
    max_clusters: Optional[int] = None
    overrides: Sequence[str] = field(default_factory=tuple)  # for the expert recipe

    def __post_init__(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise DataError(f"keep_fraction: must be in (0, 1], got {self.keep_fraction}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad or not self.templates:
            raise DataError(f"templates: each needs exactly one '{{}}' for the subject; bad: {bad or 'none given'}")


def run_apprenticeship(manifest: str | Path, settings: ApprenticeshipSettings, metrics: Sequence,
                       log: Callable[[str], None] = print) -> Path:
    """Run the recipe over the clusters of ``manifest``; return the written in-context manifest."""
    records = read_manifest(manifest)
    clusters: dict[str, list[ClusterRecord]] = defaultdict(list)
    for r in records:
        if r.role != "target":
            clusters[r.cluster].append(r)
    names = sorted(clusters)[: settings.max_clusters]
    out = Path(settings.out)
    for i, name in enumerate(names):
        log(f"cluster {i + 1}/{len(names)}: {name}")
        apprentice_cluster(name, clusters[name], settings, metrics, log)
    return write_apprentice_manifest(out, {n: clusters[n] for n in names})


def apprentice_cluster(name: str, examples: list[ClusterRecord], settings: ApprenticeshipSettings,
                       metrics: Sequence, log: Callable[[str], None]) -> dict:
    """Train the expert on one cluster, generate, score, keep the best; skipped when done earlier."""
    from personalize.evaluation.subjects import BenchSubject, EvalPrompt, prompt_kind
    from personalize.evaluation.settings import EvalSettings
    from personalize.evaluation.records import write_json
    from personalize.evaluation.rows import FineTuneRow

    work = Path(settings.out) / "clusters" / slug(name)
    result_file = work / "result.json"
    if result_file.is_file():
        log(f"{name}: done earlier, skipped")
        return json.loads(result_file.read_text())
    noun = next((r.subject_class for r in examples if r.subject_class), None) or settings.class_noun
    if not noun:
        raise DataError(f"cluster {name}: its records have no \"class\" and no class noun was given (--class-noun)")
    refs_dir = work / "examples"  # the expert trains on exactly this cluster's images
    if not refs_dir.is_dir():
        tmp = work / ".examples"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for j, r in enumerate(examples):
            shutil.copyfile(r.path, tmp / f"{j:03d}{r.path.suffix.lower()}")
        tmp.rename(refs_dir)
    references = sorted(refs_dir.iterdir())
    prompts = [EvalPrompt(j, t, prompt_kind(t)) for j, t in enumerate(settings.templates)]
    # the expert trains on each example's own caption with the subject named ("a sks ball on the beach"),
    # so it does not learn the examples' backgrounds as part of the subject
    subject = BenchSubject(name, noun, references, prompts, reference_captions=[r.text for r in examples])
    eval_settings = EvalSettings(out=settings.out, images_per_prompt=settings.images_per_prompt, seed=settings.seed,
                                 steps=settings.steps, guidance=settings.guidance, caption_references=True)
    overrides = [*([f"model.base={settings.base}"] if settings.base else []), *settings.overrides]
    row = FineTuneRow(settings.expert_recipe, overrides, label="expert")
    stats = row.prepare(subject, work, eval_settings, log)
    texts, images = row.generate(subject, work, eval_settings)
    candidates = []
    for prompt, group in zip(prompts, images):
        metric_prompt = prompt.text(noun)
        for j, image in enumerate(group):
            scores = {}
            for metric in metrics:
                scores.update(metric.score([image], references, metric_prompt))
            candidates.append({"template": prompt.template, "caption": metric_prompt, "image": j, "scores": scores,
                               "score": sum(scores.values()), "pil": image})
    keep = max(1, math.ceil(settings.keep_fraction * len(candidates)))
    ranked = sorted(candidates, key=lambda c: -c["score"])
    kept = []
    for k, c in enumerate(ranked[:keep]):
        path = work / "targets" / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        c["pil"].save(path)
        kept.append({**{key: v for key, v in c.items() if key != "pil"}, "file": str(path)})
    row.cleanup(work, eval_settings)
    result = {"cluster": name, "class": noun, "examples": len(examples), "generated": len(candidates),
              "kept": kept, "train_seconds": stats.get("train_seconds"),
              "score_kept_mean": sum(c["score"] for c in kept) / len(kept),
              "score_all_mean": sum(c["score"] for c in candidates) / len(candidates)}
    write_json(result_file, result)
    log(f"{name}: kept {len(kept)} of {len(candidates)} generations (mean score {result['score_kept_mean']:.3f} "
        f"vs {result['score_all_mean']:.3f} for all)")
    return result


def write_apprentice_manifest(out: Path, clusters: dict[str, list[ClusterRecord]]) -> Path:
    """The in-context manifest from the finished clusters: their images as examples, kept generations as
    targets (context "generated: TEMPLATE", so targets differ in context from the examples)."""
    records = []
    for name, examples in clusters.items():
        result_file = out / "clusters" / slug(name) / "result.json"
        if not result_file.is_file():
            continue
        result = json.loads(result_file.read_text())
        records += [ClusterRecord(r.cluster, r.path, r.text, r.context, r.subject_class, "example") for r in examples]
        records += [ClusterRecord(name, Path(k["file"]), k["caption"], f"generated: {k['template']}", result["class"],
                                  "target") for k in result["kept"]]
    if not records:
        raise DataError(f"{out}: no cluster finished yet, so there is no manifest to write")
    return write_manifest(records, out / "manifest.jsonl")
