"""ToyBench logic with a stand-in judge: prompts, references, ceiling specs, scoring, report files."""

from __future__ import annotations

import json

import numpy as np

from personalize.toyworld import heldout_subjects, render
from personalize.toyworld.toybench import (
    ceiling_images, mean_rows, reference_specs, score, toybench_prompts, write_report, write_references,
)


class ExactJudge:
    """Knows the answer: identity = the rendered pixels, attributes = what was asked when images match."""

    def __init__(self, subject, prompts, n):
        self.truth = {render(p.spec(subject, j)).tobytes(): p.spec(subject, j) for p in prompts for j in range(n)}

    def subject_fidelity(self, generated, references):
        a = generated.reshape(len(generated), -1).astype(float)
        b = references.reshape(len(references), -1).astype(float)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        return float((a @ b.T).mean())

    def prompt_fidelity(self, images, specs):
        return float(np.mean([self.truth.get(image.tobytes()) == spec for image, spec in zip(images, specs)]))


def test_prompts_cover_dreambench_kinds_with_at_least_15_templates():
    subject = heldout_subjects()[0]
    prompts = toybench_prompts(subject)
    kinds = [p.kind for p in prompts]
    assert len(prompts) >= 15 and set(kinds) == {"recontextualization", "accessorization", "property"}
    texts = [p.text(f"sks {subject.cls}") for p in prompts]
    assert f"a sks {subject.cls} in the snow" in texts and f"a sks {subject.cls} wearing a santa hat" in texts
    assert all(p.color != subject.color for p in prompts)  # recoloring asks for a new color


def test_references_are_fixed_renders_of_the_subject(tmp_path):
    subject = heldout_subjects()[1]
    specs = reference_specs(subject)
    assert specs == reference_specs(subject) and all(s.subject == subject and not s.accessory for s in specs)
    paths = write_references(subject, tmp_path / "refs")
    assert len(paths) == 4 and all(p.is_file() for p in paths)


def test_ceiling_scores_perfect_prompt_fidelity_and_report_files(tmp_path):
    subject = heldout_subjects()[2]
    prompts, n = toybench_prompts(subject), 2
    references = np.stack([render(s) for s in reference_specs(subject)])
    judge = ExactJudge(subject, prompts, n)
    ceiling = score(judge, subject, prompts, ceiling_images(subject, prompts, n), references, n)
    assert ceiling["prompt_fidelity"] == 1.0 and 0 < ceiling["subject_fidelity"] <= 1.0
    noise = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(len(prompts) * n)]
    base = score(judge, subject, prompts, noise, references, n)
    assert base["prompt_fidelity"] == 0.0 and base["subject_fidelity"] < ceiling["subject_fidelity"]
    assert set(ceiling) >= {"recontextualization", "accessorization", "property", "per_prompt"}

    out = tmp_path / "bench"
    write_references(subject, out / subject.name / "references")
    (out / subject.name / "base").mkdir(parents=True)
    from PIL import Image

    for i, image in enumerate(noise):
        Image.fromarray(image).save(out / subject.name / "base" / f"{i:03d}.png")
    files = write_report({subject.name: {"ceiling": ceiling, "base": base}}, out, "ToyBench test")
    assert all(path.is_file() for path in files.values())
    table = json.loads(files["json"].read_text())["table"]
    assert list(table) == ["ceiling", "base"] and table["ceiling"]["prompt_fidelity"] == 1.0
    assert "| ceiling | " in files["markdown"].read_text()
    assert (out / subject.name / "grid.png").is_file() and "grid.png" in files["html"].read_text()
    assert mean_rows({"a": {"base": base}, "b": {"base": ceiling}})["base"]["prompt_fidelity"] == 0.5
