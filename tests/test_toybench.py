"""ToyBench on the evaluation harness: prompts, references, its rows, language drift, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.evaluation.toybench import toy_subjects
from personalize.evaluation.harness import run_benchmark
from personalize.metrics import SubjectMetrics, as_pil
from personalize.evaluation.rows import ToyRendersRow
from personalize.toyworld import heldout_subjects
from personalize.evaluation.toybench import (
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
    check_labelled_grid(files["grid zorbo"], json.loads(files["json"].read_text())["subjects"]["zorbo"],
                        tmp_path / "out", ["collapsed", "diverse", "ceiling"], cell=64, columns=4)


def check_labelled_grid(path, subject: dict, out, labels: list[str], cell: int, columns: int) -> None:
    """The PNG grid: a title, a label column, the references, a header line of prompts, then one line per
    row with the first image of each prompt at ``cell`` px, exactly where the layout puts them."""
    ink = lambda region: int((region.max(-1) < 120).sum())  # noqa: E731  (dark text pixels)
    with Image.open(path) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    height, width = pixels.shape[:2]
    label_width = width - cell * columns
    assert 40 < label_width <= 140  # a label column as wide as the longest label (capped), then the images
    assert height > cell * (len(labels) + 1) + 30  # a title and a header line besides the image lines
    assert ink(pixels[:14]) > 20  # the title (subject and class)
    first_row = height - cell * len(labels)  # the rows' lines fill the bottom
    for y, label in enumerate(labels):
        top = first_row + cell * y
        prompts = sorted(subject["rows"][label]["prompts"], key=lambda p: p["index"])
        for x, prompt in enumerate(prompts):
            expected = np.asarray(Image.open(out / prompt["images"][0]).convert("RGB"))
            left = label_width + cell * x
            assert (pixels[top:top + cell, left:left + cell] == expected).all(), f"{label}, prompt {x}"
        assert ink(pixels[top:top + cell, :label_width]) > 20, f"no label for {label}"
    header = pixels[first_row - 24:first_row, label_width:]
    for x in range(len(subject["rows"][labels[0]]["prompts"])):  # every prompt column has its header
        assert ink(header[:, cell * x:cell * (x + 1)]) > 5, f"no header over prompt column {x}"
    reference = np.asarray(Image.open(out / subject["references"]["thumbnails"][0]).convert("RGB"))
    assert any((pixels[y:y + cell, label_width:label_width + cell] == reference).all()
               for y in range(first_row - cell))  # the references' line, above the header
