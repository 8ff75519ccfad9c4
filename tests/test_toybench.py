"""ToyBench on the evaluation harness: prompts, references, its rows, language drift, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.dreambench import toy_subjects
from personalize.harness import run_benchmark
from personalize.metrics import SubjectMetrics, as_pil
from personalize.rows import ToyRendersRow
from personalize.toyworld import heldout_subjects
from personalize.toyworld.toybench import (
    ROWS, reference_specs, toybench_prompts, toybench_rows, toybench_settings, write_references,
)


class PixelMetric(SubjectMetrics):
    """Subject fidelity on raw pixels: identical images score 1."""
    image_metric = "pixels"

    def embed_images(self, images):
        return torch.stack([torch.as_tensor(np.array(as_pil(i).convert("RGB").resize((16, 16))),
                                            dtype=torch.float32).flatten() - 128 for i in images])


class CollapsedRow(ToyRendersRow):
    """Generates real renders; its class prompt gives back the subject's references (total drift)."""

    def class_prompt_images(self, subject, work_dir, settings):
        return [Image.open(p) for p in subject.references]


class DiverseRow(ToyRendersRow):
    """Its class prompt gives unrelated random images (no drift)."""

    def class_prompt_images(self, subject, work_dir, settings):
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(settings.drift_images)]


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


def test_toybench_rows_are_harness_rows_with_their_recipes():
    rows = toybench_rows(ROWS)
    assert [r.label for r in rows] == list(ROWS)
    by_label = {r.label: r for r in rows}
    assert by_label["dreambooth"].config.prior.enabled and not by_label["dreambooth_no_prior"].config.prior.enabled
    assert by_label["lora"].config.method == "lora" and by_label["base"].base == "toy"
    assert isinstance(by_label["ceiling"], ToyRendersRow)
    with pytest.raises(ValueError, match="unknown ToyBench rows nope"):
        toybench_rows(["base", "nope"])


def test_language_drift_and_png_grids_in_the_report(tmp_path):
    subjects = toy_subjects(["zorbo"], tmp_path / "refs", prompt_indices=[0, 9, 14])
    rows = [CollapsedRow("toy", "collapsed"), DiverseRow("toy", "diverse"), ToyRendersRow("toy", "ceiling")]
    settings = toybench_settings(tmp_path / "out", n=2, drift_images=4)
    files = run_benchmark(subjects, rows, [PixelMetric()], settings, log=lambda m: None)
    table = json.loads(files["json"].read_text())["table"]
    collapsed, diverse = table["collapsed"]["drift"]["pixels"], table["diverse"]["drift"]["pixels"]
    refs_vs_refs = table["real images"]["mean"]["pixels"]  # distinct pairs; the collapsed row adds identical ones
    assert collapsed["to_subject"] == pytest.approx((12 * refs_vs_refs + 4) / 16)
    assert collapsed["to_subject"] > diverse["to_subject"] + 0.3 and diverse["among_themselves"] < 0.2
    assert "drift" not in table["ceiling"]  # real renders have no class prompt
    md = files["markdown"].read_text()
    assert "Language drift" in md and "| collapsed | pixels |" in md and "](grids/zorbo.png)" in md
    with Image.open(files["grid zorbo"]) as grid:  # references + one line per row, one image per prompt
        assert grid.size == (64 * 4, 64 * 4)  # 64 px toy images stay at their own size
