"""The report's PNG grid of one subject (``grids/<subject>.png``): a title, the references, then a line per
row and a column per prompt, labelled (row labels, shortened prompts): the picture people share."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from personalize.utils.files import save_image


INK, PAPER, BAND, RULE = (34, 34, 34), (255, 255, 255), (244, 244, 244), (221, 221, 221)


def short_prompt(template: str) -> str:
    """A prompt template as a column header: the subject as "…", a leading article dropped
    ("a {} in the snow" -> "… in the snow", "a purple {}" -> "purple …")."""
    words = str(template).split()
    if len(words) > 1 and words[0].lower() in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words).replace("{}", "…")


def _fit(draw, text: str, font, width: float) -> str:
    """``text``, cut with "…" to fit ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap_text(draw, text: str, font, width: float, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``width`` px, at most ``max_lines`` (the last one cut with "…")."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:]) + "…"]
    return [_fit(draw, line, font, width) for line in lines]


def png_grid(plan: dict, s: dict, out: Path, cell: int = 96) -> Optional[Path]:
    """``grids/<subject>.png``: a title line (the subject and its class); the references; a header line
    with each prompt, shortened (``short_prompt``); then one line per finished row, labelled on the left,
    with the first image of each prompt (``cell`` px squares; small images keep their own size and scale
    up sharply). None when no row has finished."""
    from PIL import Image, ImageDraw, ImageFont

    references = [out / t for t in (s["references"] or {}).get("thumbnails", [])]
    rows = [(row["label"], s["rows"][row["label"]]) for row in plan["rows"] if row["label"] in s["rows"]]
    prompts: dict[int, dict] = {}
    for _, r in rows:
        for p in r["prompts"]:
            prompts.setdefault(p["index"], p)
    indices = sorted(prompts)
    images = [i for _, r in rows for p in r["prompts"] for i in p["images"][:1]]
    if not images:
        return None
    with Image.open(references[0] if references else out / images[0]) as first:
        cell = min(cell, max(first.size))  # the toy world's 64 px stay at their own size
    small = ImageFont.load_default(size=max(10, cell // 8))
    large = ImageFont.load_default(size=max(10, cell // 8) + 2)
    pad, line = 4, lambda font: int(font.size * 1.25)  # noqa: E731
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = (["references"] if references else []) + [label for label, _ in rows]
    label_width = math.ceil(min(max(measure.textlength(t, font=large) for t in labels) + 2 * pad,
                                max(2 * cell, 140)))
    headers = [wrap_text(measure, short_prompt(prompts[i].get("template", prompts[i].get("prompt", ""))), small,
                         cell - 2 * pad, 4) for i in indices]
    header_height = max((len(h) for h in headers), default=1) * line(small) + 2 * pad
    title_height = line(large) + 2 * pad
    columns = max(len(references), len(indices))
    top = title_height + (cell if references else 0)  # where the header line starts
    size = (label_width + cell * columns, top + header_height + cell * len(rows))
    grid = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(grid)
    draw.rectangle([0, title_height, label_width - 1, size[1] - 1], fill=BAND)
    draw.rectangle([label_width, top, size[0] - 1, top + header_height - 1], fill=BAND)
    title = f"{s['name']} ({s['class']})"
    draw.text((pad, pad), _fit(draw, title, large, size[0] - 2 * pad), font=large, fill=INK)

    def label(text: str, y: int) -> None:
        lines = wrap_text(draw, text, large, label_width - 2 * pad, max(1, (cell - 2 * pad) // line(large)))
        y += (cell - len(lines) * line(large)) // 2
        for k, t in enumerate(lines):
            draw.text((pad, y + k * line(large)), t, font=large, fill=INK)

    def paste(path: Path, x: int, y: int) -> None:
        with Image.open(path) as image:
            resample = Image.Resampling.NEAREST if max(image.size) <= cell else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (label_width + cell * x, y))

    if references:
        label("references", title_height)
        for x, path in enumerate(references):
            paste(path, x, title_height)
    draw.text((pad, top + pad), "prompt", font=small, fill=INK)
    for x, lines in enumerate(headers):
        left = label_width + cell * x
        if x:
            draw.line([left, top, left, top + header_height - 1], fill=RULE)
        for k, t in enumerate(lines):
            width = draw.textlength(t, font=small)
            draw.text((left + (cell - width) / 2, top + pad + k * line(small)), t, font=small, fill=INK)
    for y, (row_label, r) in enumerate(rows):
        y0 = top + header_height + cell * y
        label(row_label, y0)
        by_index = {p["index"]: p for p in r["prompts"]}
        for x, index in enumerate(indices):
            if by_index.get(index, {}).get("images"):
                paste(out / by_index[index]["images"][0], x, y0)
    path = out / "grids" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(s['slug'])).lstrip('.') or '_'}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image(grid, path)
