"""Benchmark data: DreamBench folders (and toy-world subjects in the same shape), prompts and their kinds.

A DreamBench-layout folder holds one folder of photos per subject (``dog/00.jpg`` ...) and
``prompts_and_classes.txt``: the ``subject_name,class`` list, then the 25 *object* prompts and the 25
*live subject* prompts written as ``'a {0} {1} in the jungle'.format(unique_token, class_token)``.
Live subjects are the cats and dogs (DreamBench's nine live subjects are exactly its ``cat`` and
``dog`` classes); every other subject gets the object prompts.

Prompt kinds (DreamBench's three applications), decided from the template alone:

- **property modification**: words stand between the article and the subject ("a red {}",
  "a cube shaped {}", "a big {}");
- **accessorization**: the subject is then "wearing" something or is "in a ... outfit";
- **recontextualization**: everything else (a new scene or background: "a {} in the jungle").

On the DreamBench lists this gives 20 / 0 / 5 prompts for objects and 10 / 10 / 5 for live subjects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from personalize.data.images import IMAGE_EXTENSIONS, DataError

KINDS = ("recontextualization", "accessorization", "property")
KIND_NAMES = {"recontextualization": "recontextualization", "accessorization": "accessorization",
              "property": "property modification"}
LIVE_CLASSES = frozenset({"cat", "dog"})
PROMPTS_FILE = "prompts_and_classes.txt"


def prompt_kind(template: str) -> str:
    """The DreamBench kind of a template whose subject slot is ``{}`` (see the module docstring)."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{}} for the subject")
    before, after = template.split("{}", 1)
    if len([w for w in before.split() if w.lower() not in {"a", "an", "the"}]) > 0:
        return "property"
    if re.search(r"\bwearing\b|\boutfit\b", after):
        return "accessorization"
    return "recontextualization"


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt template; ``{}`` stands for the subject's words ("sks dog", "<sks>", or "dog")."""
    index: int
    template: str
    kind: str
    toy: Any = None  # the toy world's BenchPrompt, when the subject is a toy-world subject

    def text(self, words: str) -> str:
        if self.toy is not None:
            return self.toy.text(words)
        return " ".join(self.template.format(words).split())


@dataclass
class BenchSubject:
    name: str
    class_noun: str
    references: list[Path]
    prompts: list[EvalPrompt]
    live: bool = False
    toy: Any = None  # personalize.toyworld.Subject for toy-world subjects
    reference_captions: Optional[list[str]] = None  # what each reference shows (in-context rows); None: "a {class}"

    def captions(self) -> list[str]:
        return self.reference_captions or [f"a photo of a {self.class_noun}"] * len(self.references)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)


@dataclass
class PromptLists:
    classes: dict[str, str]  # subject name -> class noun
    object_prompts: list[str] = field(default_factory=list)  # templates with "{}"
    live_prompts: list[str] = field(default_factory=list)


def parse_prompts_file(path: str | Path) -> PromptLists:
    """Read DreamBench's ``prompts_and_classes.txt``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (a DreamBench folder has {PROMPTS_FILE})")
    text = path.read_text(encoding="utf-8")
    if "Prompts" not in text or "Live Subject Prompts" not in text:
        raise DataError(f"{path}: expected the sections 'Classes', 'Object Prompts' and 'Live Subject Prompts'")
    head, prompts = re.split(r"^Prompts\s*$", text, maxsplit=1, flags=re.M)
    classes = {}
    for line in head.splitlines():
        if "," in line and not line.startswith("subject_name"):
            name, cls = (s.strip() for s in line.split(",", 1))
            classes[name] = cls
    objects, live = re.split(r"^Live Subject Prompts\s*$", prompts, maxsplit=1, flags=re.M)

    def templates(block: str) -> list[str]:
        found = re.findall(r"""['"](.*?)['"]\.format\(\s*unique_token\s*,\s*class_token\s*\)""", block)
        for t in found:
            if "{0} {1}" not in t:
                raise DataError(f"{path}: prompt {t!r} does not name the subject as '{{0}} {{1}}'")
        return [t.replace("{0} {1}", "{}") for t in found]

    lists = PromptLists(classes, templates(objects), templates(live))
    if not classes or not lists.object_prompts or not lists.live_prompts:
        raise DataError(f"{path}: found {len(classes)} classes, {len(lists.object_prompts)} object prompts and "
                        f"{len(lists.live_prompts)} live-subject prompts; expected some of each")
    return lists


def select_prompts(templates: list[str], indices: Optional[Sequence[int]]) -> list[EvalPrompt]:
    chosen = range(len(templates)) if indices is None else indices
    if not chosen:
        raise DataError("--prompts: give at least one prompt index (such as 0,10,20)")
    twice = sorted({i for i in chosen if list(chosen).count(i) > 1})
    if twice:
        raise DataError(f"--prompts: prompt indices {twice} given more than once")
    bad = [i for i in chosen if not 0 <= i < len(templates)]
    if bad:
        raise DataError(f"--prompts: prompt indices {bad} out of range (0..{len(templates) - 1})")
    return [EvalPrompt(i, templates[i], prompt_kind(templates[i])) for i in chosen]


def load_dreambench(folder: str | Path, subjects: Optional[Sequence[str]] = None,
                    prompt_indices: Optional[Sequence[int]] = None) -> list[BenchSubject]:
    """The subjects of a DreamBench-layout folder that have photos (all, or the ones named), with their
    prompt lists (all 25, or ``prompt_indices`` of them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data: {folder} is not a folder (a DreamBench folder holds one folder of photos per "
                        f"subject and {PROMPTS_FILE})")
    lists = parse_prompts_file(folder / PROMPTS_FILE)
    present = [name for name in lists.classes if (folder / name).is_dir()]
    if subjects is not None:
        missing = [s for s in subjects if s not in present]
        if missing:
            raise DataError(f"--subjects: {folder}: no photos of {', '.join(missing)} "
                            f"(subjects here: {', '.join(present)})")
        present = [s for s in present if s in subjects]
    if not present:
        raise DataError(f"{folder}: none of the subjects in {PROMPTS_FILE} has a folder of photos")
    out = []
    for name in present:
        cls = lists.classes[name]
        photos = sorted(p for p in (folder / name).iterdir()
                        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not photos:
            raise DataError(f"{folder / name}: no photos")
        live = cls in LIVE_CLASSES
        prompts = select_prompts(lists.live_prompts if live else lists.object_prompts, prompt_indices)
        out.append(BenchSubject(name, cls, photos, prompts, live))
    return out


# -- several processes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchState:
    """This process's place among the processes a launcher started (the attribute names are
    ``accelerate.PartialState``'s)."""
    process_index: int = 0
    num_processes: int = 1
    local_process_index: int = 0

    @classmethod
    def from_environment(cls, environ=None) -> "LaunchState":
        """Read what ``accelerate launch`` / ``torchrun`` set (RANK, WORLD_SIZE, LOCAL_RANK), without
        joining a process group: each process evaluates its own subjects alone."""
        import os

        env = os.environ if environ is None else environ
        return cls(int(env.get("RANK", 0) or 0), int(env.get("WORLD_SIZE", 1) or 1), int(env.get("LOCAL_RANK", 0) or 0))


def shard(subjects: Sequence, state) -> list:
    """The subjects process ``state.process_index`` of ``state.num_processes`` evaluates (round robin)."""
    if not 0 <= state.process_index < state.num_processes:
        raise ValueError(f"process index {state.process_index} outside 0..{state.num_processes - 1}")
    return list(subjects[state.process_index::state.num_processes])
