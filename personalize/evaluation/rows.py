"""Rows of the benchmark table: the ways to make images of a subject.

- :class:`FineTuneRow` personalizes the base model on the subject's photos with this project's trainer
  and a recipe (``data.instance_images``, ``data.instance_prompt``, ``prior.class_prompt`` and
  ``prior.class_images`` set per subject), then generates from the exported files with stock diffusers
  (a pipeline folder, LoRA weights or learned embeddings);
- a zero-shot row generates directly, given the subject's class noun and photos. Zero-shot methods are
  registered by name with :func:`register_zero_shot` (checked, no duplicates): ``base`` (the base model
  prompted with the class noun) and ``renders`` (toy world: real renders, the ceiling) are built in.

Every row makes image ``j`` of every prompt with a CPU generator seeded ``seed + j``. Each row says what
its images depend on (:meth:`Row.made_with`: the settings it reads, its recipe or model); the harness
stores that with every result and makes a result again when a rerun's answer differs.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from diffusers.training_utils import free_memory
from PIL import Image

from personalize.evaluation.subjects import BenchSubject
from personalize.errors import ConfigError
from personalize.sampling import render_batched
from personalize.evaluation.records import PeakMemory, as_json, changes, file_digests, read_json, slug, write_json
from personalize.utils.registry import checked_name
from personalize.utils.trees import flatten

if TYPE_CHECKING:
    from personalize.evaluation.settings import EvalSettings

Log = Callable[[str], None]


def generate_images(pipe, texts: Sequence[str], n: int, settings: EvalSettings,
                    resolution: Optional[int]) -> list[list[Image.Image]]:
    """``n`` images per prompt in batches of ``settings.batch_size`` (:func:`personalize.sampling.render_batched`)."""
    return render_batched(pipe, texts, n, settings.steps, settings.guidance, settings.seed, settings.batch_size,
                          resolution)


# -- rows -----------------------------------------------------------------------------------------

class Row:
    """One row of the table. ``prepare`` personalizes (or does nothing), ``generate`` makes the images.
    ``made_with`` names what the images depend on; ``generation_keys`` are the settings it reads."""
    label: str
    kind: str
    generation_keys: tuple[str, ...] = ("images_per_prompt", "seed")

    def check(self, subjects: Sequence[BenchSubject]) -> None:
        """Refuse, before any work, subjects or settings this row cannot run (:class:`ConfigError`)."""

    def made_with(self, settings: EvalSettings) -> dict:
        """What this row's images depend on besides the subject (its photos and prompts): the settings it
        reads and its method. A rerun whose answer differs makes the images again."""
        return as_json({**{k: v for k, v in self.describe().items() if k != "label"},
                        "generation": {k: getattr(settings, k) for k in self.generation_keys}})

    def prepare(self, subject: BenchSubject, work_dir: Path, settings: EvalSettings, log: Log) -> dict:
        return {}

    def generate(self, subject: BenchSubject, work_dir: Path, settings: EvalSettings) -> tuple[list[str], list[list]]:
        """(the prompts as given to the model, images per prompt)."""
        raise NotImplementedError

    def class_prompt_images(self, subject: BenchSubject, work_dir: Path, settings: EvalSettings) -> Optional[list]:
        """``settings.drift_images`` images of "a {class}" (for language drift); None if the row has no model."""
        return None

    def cleanup(self, work_dir: Path, settings: EvalSettings) -> None:
        pass

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind}


class FineTuneRow(Row):
    """Personalize with the trainer and ``recipe`` (plus ``overrides``), then generate from the export."""

    kind = "fine-tune"
    generation_keys = ("images_per_prompt", "seed", "steps", "guidance", "resolution", "token", "drift_images")

    def __init__(self, recipe: str, overrides: Sequence[str] = (), label: Optional[str] = None):
        from personalize.recipes import resolve_recipe
        from personalize.recipes import load_config

        self.recipe, self.overrides = resolve_recipe(recipe), tuple(overrides)
        self.config = load_config(self.recipe, list(self.overrides))  # refuses a bad recipe before any work
        self.label = slug(label or self.config.method)
        self.base = self.config.model.base

    def describe(self) -> dict:
        return {**super().describe(), "recipe": str(self.recipe), "method": self.config.method,
                "base": self.base, "overrides": list(self.overrides)}

    def recipe_name(self) -> str:
        """The recipe as `personalize recipes` names it (``tiny/lora``), or its path."""
        from personalize.recipes import RECIPES_DIR

        try:
            return self.recipe.resolve().relative_to(RECIPES_DIR).with_suffix("").as_posix()
        except ValueError:
            return str(self.recipe)

    def training_made_with(self, settings: EvalSettings) -> dict:
        """What the trained weights depend on besides the subject's photos: the recipe as loaded with the
        user's overrides (keys that do not change what a run computes left out), how the prompts name the
        subject, captioned references and the resolution."""
        from personalize.training.checkpoints import RUN_INDEPENDENT

        config = {k: v for k, v in flatten(self.config.to_dict()).items()
                  if not (k in RUN_INDEPENDENT or k.startswith(RUN_INDEPENDENT))}
        return as_json({"config": config, "words": self.placeholder() or settings.token,
                        "caption_references": settings.caption_references, "resolution": settings.resolution})

    def made_with(self, settings: EvalSettings) -> dict:
        generation = {k: getattr(settings, k) for k in self.generation_keys}
        if self.placeholder():
            generation.pop("token")  # Textual Inversion prompts name the subject by its placeholder
        return as_json({"kind": self.kind, "method": self.config.method, "recipe": self.recipe_name(),
                        "base": self.base, "overrides": list(self.overrides), "generation": generation,
                        "training": self.training_made_with(settings)})

    def placeholder(self) -> Optional[str]:
        return getattr(self.config.method_config, "placeholder_token", None)

    def words(self, subject: BenchSubject, settings: EvalSettings) -> str:
        """How prompts name the subject: the placeholder (Textual Inversion) or "<token> <class>"."""
        return self.placeholder() or f"{settings.token} {subject.class_noun}"

    def instance_folder(self, subject: BenchSubject, work_dir: Path, settings: EvalSettings) -> Path:
        """The folder the method trains on: the subject's references, or (``settings.caption_references``
        and the subject has reference captions) copies of them with a caption file each that names the
        subject the way this row's prompts do ("a ring on the grass" -> "a sks ring on the grass"), as
        kohya / ai-toolkit users caption their photos so the context is not learned as part of the subject."""
        folders = {p.parent for p in subject.references}
        if len(folders) != 1:
            raise ValueError(f"{subject.name}: references must lie in one folder")
        if not (settings.caption_references and subject.reference_captions):
            return folders.pop()
        folder = work_dir / "instance-images"
        folder.mkdir(parents=True, exist_ok=True)
        words = self.words(subject, settings)
        for path, text in zip(subject.references, subject.captions()):
            shutil.copyfile(path, folder / path.name)
            (folder / path.name).with_suffix(self.config.data.caption_extension).write_text(
                instance_caption(text, subject.class_noun, words) + "\n", encoding="utf-8")
        return folder

    def subject_overrides(self, subject: BenchSubject, run_dir: Path, settings: EvalSettings) -> list[str]:
        instance_images = self.instance_folder(subject, run_dir.parent, settings)
        words = self.words(subject, settings)
        class_images = (settings.out_dir / "class-images" / slug(self.base) /
                        f"{slug(subject.class_noun)}{settings.class_images_suffix}")
        per_subject = [f"data.instance_images={_yaml_string(instance_images)}",
                       f"data.instance_prompt={_yaml_string('a ' + words)}",
                       f"prior.class_prompt={_yaml_string('a ' + subject.class_noun)}",
                       f"prior.class_images={_yaml_string(class_images)}", f"train.output_dir={_yaml_string(run_dir)}",
                       "train.resume=auto", "train.report_to=none", "validation.prompts=[]"]
        if settings.resolution:
            per_subject.append(f"data.resolution={settings.resolution}")
        initializer = subject.class_noun.split()[-1]
        if hasattr(self.config.method_config, "initializer_token") and _single_token(initializer):
            per_subject.append(f"{self.config.method}.initializer_token={_yaml_string(initializer)}")
        return [*per_subject, *self.overrides]  # the user's overrides win

    def prepare(self, subject, work_dir, settings, log) -> dict:
        """Train on the subject, or reuse the training in ``work_dir/run`` when ``work_dir/train.json`` says
        it was made with the same settings and photos (finished, or stopped: then the trainer resumes it).
        A training made with other settings is removed first: ``run/`` is this harness's own folder."""
        from personalize.recipes import load_config
        from personalize.training.trainer import Trainer

        run_dir, record = work_dir / "run", work_dir / "train.json"
        made_with = {**self.training_made_with(settings), "references": file_digests(subject.references)}
        earlier = read_json(record) if record.is_file() else None
        if earlier is not None and earlier.get("made_with") != made_with:
            if run_dir.is_dir():
                log(f"{subject.name}: {self.label}: the training in {run_dir} was made with other settings ("
                    + "; ".join(changes(earlier.get("made_with"), made_with)) + "); training again")
                shutil.rmtree(run_dir)
            earlier = None
        summary = read_json(run_dir / "run_summary.json") if earlier is not None else None
        if earlier is not None and not earlier.get("finished") and summary is not None:
            # the training finished (its export is complete); only this record of it was not written
            seconds = summary.get("train_seconds")
            earlier = {"train_seconds": seconds, "train_loop_seconds": seconds,
                       "train_steps": summary.get("steps"), "peak_memory_train_mib": None, "made_with": made_with,
                       "finished": True}
            write_json(record, earlier)
        if earlier is not None and earlier.get("finished") and run_dir.is_dir():
            log(f"{subject.name}: {self.label}: training finished earlier, reusing {run_dir}")
            return earlier
        config = load_config(self.recipe, self.subject_overrides(subject, run_dir, settings))
        write_json(record, {"made_with": made_with, "finished": False})  # a stopped run resumes only with these
        log(f"{subject.name}: {self.label}: training ({config.method}, {config.train.max_steps} steps) ...")
        device = settings.torch_device()
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            trainer = Trainer(config)
            trainer.train()
        stats = {"train_seconds": time.perf_counter() - start, "train_loop_seconds": trainer.train_seconds(),
                 "train_steps": trainer.step, "peak_memory_train_mib": peak.mib}
        del trainer
        free_memory()
        write_json(record, {**stats, "made_with": made_with, "finished": True})
        return {**stats, "made_with": made_with, "finished": True}

    def pipeline(self, run_dir: Path):
        """Stock diffusers over the export: a pipeline folder, LoRA weights or learned embeddings."""
        from personalize.sampling import build_pipeline

        if (run_dir / "model_index.json").is_file():
            return build_pipeline(str(run_dir))
        if (run_dir / "pytorch_lora_weights.safetensors").is_file():
            return build_pipeline(self.base, lora=str(run_dir))
        if (run_dir / "learned_embeds.safetensors").is_file():
            return build_pipeline(self.base, embeddings=str(run_dir), token=self.placeholder())
        files = ", ".join(sorted(p.name for p in run_dir.iterdir())) if run_dir.is_dir() else "nothing"
        raise ConfigError(f"{run_dir}: no exported pipeline, LoRA or embeddings to generate from (found {files})")

    def _images(self, work_dir: Path, texts: list[str], n: int, settings: EvalSettings) -> list[list[Image.Image]]:
        pipe = self.pipeline(work_dir / "run").to(settings.torch_device())
        pipe.set_progress_bar_config(disable=True)
        images = generate_images(pipe, texts, n, settings, settings.resolution or self.config.data.resolution)
        del pipe
        return images

    def generate(self, subject, work_dir, settings):
        texts = [p.text(self.words(subject, settings)) for p in subject.prompts]
        return texts, self._images(work_dir, texts, settings.images_per_prompt, settings)

    def class_prompt_images(self, subject, work_dir, settings):
        return self._images(work_dir, [f"a {subject.class_noun}"], settings.drift_images, settings)[0]

    def cleanup(self, work_dir, settings):
        if not settings.keep_weights:
            shutil.rmtree(work_dir / "run", ignore_errors=True)


def instance_caption(caption: str, class_noun: str, words: str) -> str:
    """``caption`` with the subject named by ``words``: its first ``class_noun`` replaced ("a ring on the
    grass", "ring", "sks ring" -> "a sks ring on the grass"); a caption without the class noun is kept
    and prefixed ("a sks ring, " + caption)."""
    match = re.search(rf"\b{re.escape(class_noun)}\b", caption)
    if match is None:
        return f"a {words}, {caption}"
    return caption[:match.start()] + words + caption[match.end():]


def _yaml_string(value) -> str:
    """``value`` as an override value that YAML reads back as the same string (paths with ':' or '#')."""
    return json.dumps(str(value))


def _single_token(word: str) -> bool:
    from personalize.models.tokenizer import build_clip_tokenizer

    return len(build_clip_tokenizer().encode(word, add_special_tokens=False)) == 1


ZERO_SHOT: dict[str, type] = {}


def register_zero_shot(cls: type) -> type:
    """Class decorator: a zero-shot row, built as ``cls(base, label, arg)`` (``arg``: what follows
    ``NAME:`` in the row spec, e.g. a model folder), with ``generate`` (checked, no duplicates, like methods)."""
    ZERO_SHOT[checked_name(ZERO_SHOT, cls, "name", "a zero-shot method")] = cls
    return cls


class ZeroShotRow(Row):
    kind = "zero-shot"
    name = ""

    def __init__(self, base: Optional[str], label: Optional[str] = None, arg: Optional[str] = None):
        self.base, self.label, self.arg = base, slug(label or self.name), arg

    def describe(self) -> dict:
        return {**super().describe(), "method": self.name, "base": self.base}


@register_zero_shot
class BaseModelRow(ZeroShotRow):
    """The base model prompted with the class noun: what the model does without the subject."""

    name = "base"
    generation_keys = ("images_per_prompt", "seed", "steps", "guidance", "resolution", "drift_images")

    def check(self, subjects):
        if not self.base:
            raise ConfigError(f"row {self.label}: the base row needs a base model: give --base (or a recipe row "
                              "whose model.base it takes)")

    def _images(self, texts: list[str], n: int, settings: EvalSettings) -> list[list[Image.Image]]:
        from personalize.sampling import build_pipeline

        self.check([])
        pipe = build_pipeline(self.base).to(settings.torch_device())
        pipe.set_progress_bar_config(disable=True)
        images = generate_images(pipe, texts, n, settings, settings.resolution)
        del pipe
        return images

    def generate(self, subject, work_dir, settings):
        texts = [p.text(subject.class_noun) for p in subject.prompts]
        return texts, self._images(texts, settings.images_per_prompt, settings)

    def class_prompt_images(self, subject, work_dir, settings):
        return self._images([f"a {subject.class_noun}"], settings.drift_images, settings)[0]


@register_zero_shot
class ToyRendersRow(ZeroShotRow):
    """Toy world only: real renders of the subject showing what each prompt asks (ToyBench's ceiling)."""

    name = "renders"

    def check(self, subjects):
        other = [s.name for s in subjects if s.toy is None]
        if other:
            raise ConfigError(f"row {self.label}: real renders exist only of toy-world subjects (--toy); "
                              f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} not one")

    def generate(self, subject, work_dir, settings):
        from personalize.toyworld.world import render

        self.check([subject])
        n = settings.images_per_prompt
        images = [[Image.fromarray(render(p.toy.spec(subject.toy, settings.seed + j))) for j in range(n)]
                  for p in subject.prompts]
        return [p.text(subject.class_noun) for p in subject.prompts], images


@register_zero_shot
class InContextRow(ZeroShotRow):
    """The in-context model (``incontext:FOLDER``, the output of ``personalize train`` with method
    incontext): generates from the subject's references directly, no training. Guidance: the harness's
    ``guidance`` on text, ``ref_guidance`` on the references (None: the model's own ``ref_scale``); ``bf16``:
    under bfloat16 autocast."""

    name = "incontext"
    generation_keys = ("images_per_prompt", "seed", "steps", "guidance", "ref_guidance", "bf16", "ref_interval",
                       "references")

    def __init__(self, base, label=None, arg=None):
        super().__init__(base, label, arg)
        if not arg:
            raise ConfigError("the incontext row needs its model folder: incontext:FOLDER")

    def check(self, subjects):
        from personalize.incontext.model import read_spec

        read_spec(self.arg)  # a folder that is not an in-context model is refused before any work

    def describe(self) -> dict:
        from personalize.incontext.model import read_spec

        # the scale the model was shipped with: used when the settings give none
        return {**super().describe(), "model": self.arg, "ref_scale": read_spec(self.arg).default_ref_scale}

    def generate(self, subject, work_dir, settings):
        from personalize.incontext.model import read_spec
        from personalize.incontext.pipeline import InContextPipeline

        spec = read_spec(self.arg)
        pipe = InContextPipeline.from_pretrained(self.arg, base=self.base or spec.base,
                                                 device=settings.torch_device())
        k = settings.references or spec.num_references
        texts = [p.text(subject.class_noun) for p in subject.prompts]
        images = [pipe(text, subject.references[:k], subject.captions()[:k], num_images=settings.images_per_prompt,
                       text_scale=settings.guidance, ref_scale=settings.ref_guidance, steps=settings.steps,
                       seed=settings.seed, bf16=settings.bf16, allow_more_references=k > spec.num_references,
                       ref_interval=tuple(settings.ref_interval) if settings.ref_interval else None)
                  for text in texts]
        return texts, images


def build_row(spec: str, base: Optional[str] = None, overrides: Sequence[str] = ()) -> Row:
    """``[LABEL=]NAME[:ARG]``: NAME a zero-shot method (base, renders, incontext:FOLDER, ...) or a recipe
    (path or shipped name). ``base`` replaces every recipe's model.base."""
    label, _, name = spec.partition("=") if "=" in spec else (None, "", spec)
    zero_shot, _, arg = name.partition(":")
    if zero_shot in ZERO_SHOT:
        return ZERO_SHOT[zero_shot](base, label or None, arg or None)
    extra = [f"model.base={base}"] if base else []
    return FineTuneRow(name, [*extra, *overrides], label or None)
