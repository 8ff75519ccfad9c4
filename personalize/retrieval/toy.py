"""A toy-world test collection: renders of many subjects, each captioned with a made-up name of its own
(:func:`toy_names`, :func:`toy_caption`, :func:`toy_named_collection`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kl", "pl",
           "sn", "tr", "qu", "j", "w", "sk", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai", "ou")
_CODAS = ("n", "x", "m", "k", "l", "r", "b", "sh", "p")
_TEMPLATES = ("a photo of {name} the {cls}", "{name} the {cls}", "a picture of {name} the {cls}",
              "a close-up photo of {name} the {cls}")


def toy_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up pronounceable names ("zorbo"-like: two or three syllables), the same for
    the same seed; name ``i`` does not depend on ``n``. None is a held-out subject's name or a toy-world
    word."""
    from personalize.toyworld.world import ACCESSORIES, CLASSES, COLORS, HELDOUT_NAMES, SCENES

    taken = set(HELDOUT_NAMES) | set(CLASSES) | set(COLORS)
    taken |= {w for words in (*SCENES.values(), *ACCESSORIES.values()) for w in words.split()}
    names: list[str] = []
    for i in range(n):
        for attempt in range(1000):
            rng = np.random.default_rng([31, seed, i, attempt])
            syllables = 2 if rng.random() < 0.75 else 3
            name = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS))
                           + (str(rng.choice(_CODAS)) if rng.random() < 0.3 else "") for _ in range(syllables))
            if name not in taken and len(name) <= 10:
                break
        else:  # pragma: no cover - 1000 collisions in a row would need far more names than syllables allow
            raise RuntimeError(f"could not find a new name for subject {i}")
        taken.add(name)
        names.append(name)
    return names


@dataclass(frozen=True)
class ToyNamedSubject:
    """One subject of a toy named collection: its name, training-subject number, class and files."""

    name: str
    subject: int
    cls: str
    files: tuple[Path, ...]

    @property
    def query(self) -> str:
        """The name query that should retrieve this subject's renders: "zorbo the star"."""
        return f"{self.name} the {self.cls}"


def toy_caption(name: str, spec, template: str = _TEMPLATES[0]) -> str:
    """A named caption of a toy-world spec: "a photo of zorbo the star wearing a santa hat on the beach"."""
    from personalize.toyworld.world import ACCESSORIES, SCENES

    words = [template.format(name=name, cls=spec.cls)]
    if spec.accessory:
        words.append(f"wearing {ACCESSORIES[spec.accessory]}")
    if spec.scene:
        words.append(SCENES[spec.scene])
    return " ".join(words)


def toy_named_collection(folder: str | Path, n_subjects: int, per_subject: int, seed: int = 0,
                         first_subject: int = 0, progress: bool = False) -> list[ToyNamedSubject]:
    """Write ``per_subject`` renders of training subjects ``first_subject ..`` ``+ n_subjects - 1`` to
    ``folder/<name>/<NN>.png``, each with its caption ``<NN>.txt`` naming the subject by a made-up name of
    its own (:func:`toy_names`) in a random scene, accessory, size and position. The same arguments write
    the same files."""
    from personalize.toyworld.world import render, sample_spec, training_subject

    folder = Path(folder)
    subjects = []
    names = toy_names(n_subjects, seed)
    for i, name in enumerate(tqdm(names, desc="rendering toy collection", disable=not progress)):
        number = first_subject + i
        subject = training_subject(number)
        rng = np.random.default_rng([32, seed, number])
        (folder / name).mkdir(parents=True, exist_ok=True)
        files = []
        for r in range(per_subject):
            spec = sample_spec(rng, subject, p_accessory=0.3, p_no_scene=0.1)
            template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
            path = folder / name / f"{r:02d}.png"
            Image.fromarray(render(spec)).save(path)
            path.with_suffix(".txt").write_text(toy_caption(name, spec, template) + "\n", encoding="utf-8")
            files.append(path)
        subjects.append(ToyNamedSubject(name, number, subject.cls, tuple(files)))
    return subjects
