"""The benchmark report, rebuilt from the harness's files: ``results.json``, ``report.md``, ``report.html``
(tables, and per subject a grid: references | each row's images per prompt) and ``grids/<subject>.png``
(the same images in one labelled picture: a line per row, a column per prompt).

Everything is read from ``<out>/plan.json``, ``<out>/references/<subject>/result.json`` and
``<out>/<row>/<subject>/result.json``, so any process can rewrite the report at any time; subjects not
finished yet are listed as pending.

Each result carries ``made_with`` (:mod:`personalize.evaluation.harness`): what its numbers were made with. Results
made with the same (apart from each subject's own photos and prompt texts) share a settings id, S1, S2,
...; every table names the ids of its numbers and the Settings table spells them out. A row whose
subjects were made with different settings gets one line per id: such numbers are never averaged.

The HTML is rendered by Jinja2 with autoescape on (``templates/report.html.j2``): every field, from the
title to a subject's name, is escaped. It refers to images by relative paths and opens from disk.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from personalize.evaluation.subjects import KIND_NAMES, KINDS
from personalize.errors import DataError
from personalize.evaluation.metrics import DISPLAY_NAMES
from personalize.evaluation.rows import flat
from personalize.utils.files import atomic_write_json, atomic_write_text, save_image

REAL = "real images"
PLAN = "plan.json"
SUBJECT_OWN = ("prompt_templates", "references")  # parts of made_with that differ by subject, not by setting
PLAN_KEYS = ("title", "subjects", "rows", "metrics")
RESULT_KEYS = ("mean", "kinds", "prompts", "train_seconds", "generate_seconds", "peak_memory_train_mib",
               "peak_memory_generate_mib", "memory")
REFERENCE_KEYS = ("thumbnails", "scores")


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _read(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A JSON object the harness wrote; anything else is a :class:`DataError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None
    missing = [k for k in keys if k not in value] if isinstance(value, dict) else list(keys)
    if missing:
        raise DataError(f"{path}: not {what} written by personalize eval (no {', '.join(missing)})")
    return value


def collect(out: Path) -> tuple[dict, dict]:
    """(plan, subjects): each subject with its references result and its finished rows."""
    plan_file = out / PLAN
    if not plan_file.is_file():
        raise DataError(f"--out: {out} holds no benchmark results (no {PLAN}); run `personalize eval ... --out "
                        f"{out}` first")
    plan = _read(plan_file, "a benchmark plan", PLAN_KEYS)
    shapes = [(plan["subjects"], ("name", "slug", "class", "live")), (plan["rows"], ("label",))]
    if not all(isinstance(items, list) and all(isinstance(i, dict) and all(k in i for k in keys) for i in items)
               for items, keys in shapes):
        raise DataError(f"{plan_file}: not a benchmark plan written by personalize eval (its subjects or rows)")
    subjects = {}
    for s in plan["subjects"]:
        ref_file = out / "references" / s["slug"] / "result.json"
        entry = {**s, "references": _read(ref_file, "a references result", REFERENCE_KEYS) if ref_file.is_file()
                 else None, "rows": {}}
        for row in plan["rows"]:
            result_file = out / row["label"] / s["slug"] / "result.json"
            if result_file.is_file():
                entry["rows"][row["label"]] = _read(result_file, "a benchmark result", RESULT_KEYS)
        subjects[s["name"]] = entry
    return plan, subjects


# -- what the numbers were made with ----------------------------------------------------------------

def _shared(made_with) -> Optional[dict]:
    """The part of ``made_with`` that is the same for every subject made with the same settings."""
    return {k: v for k, v in made_with.items() if k not in SUBJECT_OWN} if isinstance(made_with, dict) else None


def label_settings(plan: dict, subjects: dict) -> dict[str, dict]:
    """Give every result a settings id (``result["settings"]``: S1, S2, ... in order of appearance, the
    references first). Returns per id: ``made_with`` (the shared part), ``text`` and ``used_by``
    (row -> subjects)."""
    ids: dict[str, str] = {}
    groups: dict[str, dict] = {}

    def give(result: dict, label: str, name: str) -> None:
        shared = _shared(result.get("made_with"))
        key = json.dumps(shared, sort_keys=True)
        if key not in ids:
            ids[key] = f"S{len(ids) + 1}"
            groups[ids[key]] = {"made_with": shared, "used_by": {}}
        result["settings"] = ids[key]
        groups[ids[key]]["used_by"].setdefault(label, []).append(name)

    for name, s in subjects.items():
        if s["references"] and s["references"]["scores"]:  # the real-images row: only where it has numbers
            give(s["references"], REAL, name)
    for row in plan["rows"]:
        for name, s in subjects.items():
            if row["label"] in s["rows"]:
                give(s["rows"][row["label"]], row["label"], name)
    first_with_text: dict[str, str] = {}
    for sid, group in groups.items():
        group["text"] = text = settings_text(group["made_with"], tuple(group["used_by"]))
        twin = first_with_text.setdefault(text, sid)
        if twin != sid:  # the same in words (a recipe edited between runs): say what else differs
            a, b = flat(groups[twin]["made_with"] or {}), flat(group["made_with"] or {})
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            group["text"] += f" (differs from {twin} in {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
    return groups


def _ranges(indices) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2, 5"``."""
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}..{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
        run = [i]
    if run:
        out.append(f"{run[0]}..{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
    return ", ".join(out)


def _short_path(text: str) -> str:
    parts = Path(text).parts
    return text if len(parts) <= 2 else "…/" + "/".join(parts[-2:])


def _method_text(row: dict) -> str:
    if row.get("kind") == "fine-tune":
        own = [o for o in row.get("overrides", []) if not str(o).startswith("model.base=")]
        text = str(row.get("recipe") or row.get("method")) + (f" with {', '.join(own)}" if own else "")
        if (row.get("training") or {}).get("caption_references"):
            text += ", captioned references"
    else:
        text = str(row.get("method") or row.get("kind") or "row")
        if row.get("model"):
            text += f" {_short_path(str(row['model']))}"
    return text + (f" on {row['base']}" if row.get("base") else "")


def _generation_text(gen: dict, row: dict, labels: list[str]) -> list[str]:
    out, reference = [], []  # the in-context settings make one phrase
    n, seed = gen.get("images_per_prompt"), gen.get("seed")
    if n is not None:
        seeds = f"seed {seed}" if n == 1 else f"seeds {seed}..{seed + n - 1}" if isinstance(seed, int) else ""
        out.append(f"{n} image{'' if n == 1 else 's'} per prompt" + (f" ({seeds})" if seeds else ""))
    for key, value in gen.items():
        if key in ("images_per_prompt", "seed"):
            continue
        if key == "steps":
            out.append(f"{value} steps")
        elif key == "ref_guidance":
            own = ", ".join(f"{label}: {row.get('ref_scale')}" for label in labels)
            reference.insert(0, f"reference guidance {value}" if value is not None
                             else f"reference guidance each model's own ({own})")
        elif key == "ref_interval":
            if value:
                reference.append(f"at noise levels {value[0]}..{value[1]} of the schedule (1 elsewhere)")
        elif key == "references":
            reference.append(f"references per subject: {value or 'as many as the model was trained with'}")
        elif key == "resolution":
            if value:
                out.append(f"resolution {value}")
        elif key == "drift_images":
            if value:
                out.append(f"{value} class-prompt images (drift)")
        elif key == "bf16":
            if value:
                out.append("bf16")
        else:
            out.append(f"{key} {value}")
    return out + ([", ".join(reference)] if reference else [])


def _metric_text(metric: dict) -> str:
    columns = "/".join(DISPLAY_NAMES.get(c, c) for c in metric.get("columns", []))
    weights = metric.get("weights") or metric.get("metric")
    return f"{columns} ({_short_path(str(weights))})" if weights else columns


def settings_text(made: Optional[dict], labels: tuple[str, ...] = ()) -> str:
    """``made_with`` (the shared part) in words: the method, the generation settings, prompts, metrics
    (``labels``: the rows made with it, for what is each model's own)."""
    if made is None:
        return "not recorded (made by an earlier version of personalize eval)"
    parts = []
    if isinstance(made.get("row"), dict):
        parts.append(_method_text(made["row"]))
        parts += _generation_text(made["row"].get("generation") or {}, made["row"], list(labels))
    if made.get("prompts") is not None:
        parts.append(f"prompts {_ranges(made['prompts'])}")
    metrics = made.get("metrics")
    parts.append("metrics " + (", ".join(_metric_text(m) for m in metrics) if metrics else "none"))
    return "; ".join(parts)


def _by_settings(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r.get("settings", "?"), []).append(r)
    return groups


# -- the summary --------------------------------------------------------------------------------------

def _row_summary(results: list[dict], names: list[str]) -> dict:
    kinds = {}
    for kind in KINDS:
        having = [r["kinds"][kind] for r in results if kind in r["kinds"]]
        if having:
            kinds[kind] = {k: _mean([h.get(k) for h in having]) for k in names}
    entry = {
        "mean": {k: _mean([r["mean"].get(k) for r in results]) for k in names}, "kinds": kinds,
        "subjects": len(results), "train_seconds": _mean([r["train_seconds"] for r in results]),
        "generate_seconds": _mean([r["generate_seconds"] for r in results]),
        "peak_memory_train_mib": max((r["peak_memory_train_mib"] or 0 for r in results), default=0) or None,
        "peak_memory_generate_mib": max(r["peak_memory_generate_mib"] for r in results),
        "memory": results[0]["memory"],
        "copy_paste_rate": _mean([r.get("copy_paste_rate") for r in results]),
    }
    drifts = [r["drift"] for r in results if r.get("drift")]
    if drifts:
        entry["drift"] = {metric: {k: _mean([d[metric][k] for d in drifts if metric in d])
                                   for k in ("to_subject", "among_themselves")} for metric in drifts[0]}
    return entry


def summary(plan: dict, subjects: dict) -> dict:
    """Per row and settings id, the means over subjects (overall and per prompt kind), times and peak memory;
    the real-images row first (references against each other: image metrics only). A row made with one
    settings id keeps its label; one made with several gets a line per id, ``"<label> [S2]"``."""
    names = plan["metrics"]
    table = {}
    real = [s["references"] for s in subjects.values() if s["references"] and s["references"]["scores"]]
    groups = _by_settings(real)
    for sid, group in groups.items():
        table[REAL if len(groups) == 1 else f"{REAL} [{sid}]"] = {
            "row": REAL, "settings": sid, "kinds": {}, "subjects": len(group),
            "mean": {k: _mean([r["scores"].get(k) for r in group]) for k in names}}
    for row in plan["rows"]:
        label = row["label"]
        groups = _by_settings([s["rows"][label] for s in subjects.values() if label in s["rows"]])
        for sid, group in groups.items():
            table[label if len(groups) == 1 else f"{label} [{sid}]"] = {"row": label, "settings": sid,
                                                                       **_row_summary(group, names)}
    return table


def pending(plan: dict, subjects: dict) -> list[str]:
    return [f"{row['label']}/{name}" for name, s in subjects.items() for row in plan["rows"]
            if row["label"] not in s["rows"]]


# -- tables (one description, written as markdown and as HTML) ------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tables(plan: dict, subjects: dict, table: dict, groups: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, body) of each table of the report."""
    names = plan["metrics"]
    cols = [DISPLAY_NAMES.get(k, k) for k in names]
    mean_rows = []
    for label, e in table.items():
        times = [_fmt(e.get("train_seconds"), 1), _fmt(e.get("generate_seconds"), 1),
                 _fmt(e.get("peak_memory_train_mib"), 0), _fmt(e.get("peak_memory_generate_mib"), 0)]
        mean_rows.append([label, e["settings"], str(e["subjects"]), *[_fmt(e["mean"][k]) for k in names],
                          _fmt(e.get("copy_paste_rate"), 2), *(times if e["row"] != REAL else ["–"] * 4)])
    memory = next((e["memory"] for e in table.values() if "memory" in e), "")
    heading = "Mean over subjects" + (f" (peak memory: {memory})" if memory else "")
    out = [(heading, ["row", "settings", "subjects", *cols, "copy-paste", "train s", "generate s", "peak train MiB",
                      "peak generate MiB"], mean_rows)]
    out.append(("Settings: what the numbers of each id were made with", ["settings", "rows: subjects", "made with"],
                [[sid, "; ".join(f"{label}: {', '.join(who)}" for label, who in g["used_by"].items()), g["text"]]
                 for sid, g in groups.items()]))
    kind_rows = [[label, KIND_NAMES[kind], *[_fmt(e["kinds"][kind][k]) for k in names]]
                 for label, e in table.items() for kind in KINDS if kind in e["kinds"]]
    if kind_rows:
        out.append(("By prompt kind", ["row", "kind", *cols], kind_rows))
    drift_rows = [[label, DISPLAY_NAMES.get(metric, metric), _fmt(d["to_subject"]), _fmt(d["among_themselves"])]
                  for label, e in table.items() for metric, d in e.get("drift", {}).items()]
    if drift_rows:
        out.append(('Language drift: images of the bare class prompt "a {class}" (similarity to the subject\'s '
                     'references, and among themselves; lower = less drift, more diverse)',
                    ["row", "metric", "to the subject", "among themselves"], drift_rows))
    subject_rows = []
    for name, s in subjects.items():
        if s["references"] and s["references"]["scores"]:
            subject_rows.append([name, s["class"], REAL, s["references"]["settings"],
                                 *[_fmt(s["references"]["scores"].get(k)) for k in names], "–", "–", "–"])
        for label, r in s["rows"].items():
            peak = f"{_fmt(r['peak_memory_train_mib'], 0)} / {_fmt(r['peak_memory_generate_mib'], 0)}"
            subject_rows.append([name, s["class"], label, r["settings"], *[_fmt(r["mean"].get(k)) for k in names],
                                 _fmt(r["train_seconds"], 1), _fmt(r["generate_seconds"], 1), peak])
    out.append(("By subject", ["subject", "class", "row", "settings", *cols, "train s", "generate s",
                               "peak MiB train / generate"], subject_rows))
    return out


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"([-+]?[\d.]+|–)( / ([-+]?[\d.]+|–))?", cell.strip()))


def _numeric_columns(header: list[str], body: list[list[str]]) -> list[bool]:
    return [bool(body) and all(_numeric(row[i]) for row in body) for i in range(len(header))]


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    align = ["---:" if numeric else "---" for numeric in _numeric_columns(header, body)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def _notes(plan: dict, subjects: dict) -> str:
    live = sum(1 for x in subjects.values() if x["live"])
    text = (f"{len(subjects)} subject{'' if len(subjects) == 1 else 's'} ({live} live). Image metrics: mean cosine "
            f"over all (generated, real) pairs of a subject; text metrics: image vs the prompt with the class noun and no unique token. The "
            f"real-images row compares each subject's photos with each other. Copy-paste: the fraction of images "
            f"that are near-duplicates of a reference (PSNR >= 20 dB at 32 px). Every number names the settings it "
            f"was made with (S1, S2, ...: the Settings table); a row made with several is split, one line each.")
    return (f"Data: `{plan['data']}`. " + text) if plan.get("data") else text


def markdown(plan: dict, subjects: dict, table: dict, groups: dict, grids: Optional[dict[str, Path]] = None) -> str:
    parts = [f"# {plan['title']}", "", _notes(plan, subjects), ""]
    for heading, header, body in tables(plan, subjects, table, groups):
        parts += [f"## {heading}", "", _markdown_table(header, body), ""]
    if grids:
        parts += ["## Images", "", "Per subject: the references, then one labelled line per row with the first "
                  "image of each prompt (columns labelled by prompt).", ""]
        parts += [f"![{name}]({quote(grid.as_posix())})" for name, grid in grids.items()] + [""]
    waiting = pending(plan, subjects)
    if waiting:
        parts += [f"Pending ({len(waiting)}): {', '.join(waiting)}", ""]
    return "\n".join(parts)


# -- HTML -----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("personalize.evaluation", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def _small(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return max(image.size) <= 128
    except OSError:
        return False


def _subject_grid(plan: dict, name: str, s: dict, out: Path) -> dict:
    """One subject's grid for the template: references | prompt | each row's images and scores."""
    names = plan["metrics"]
    labels = [r["label"] for r in plan["rows"]]
    prompts = {}
    for r in s["rows"].values():
        for p in r["prompts"]:
            prompts.setdefault(p["index"], p)
    lines = []
    for index in sorted(prompts):
        cells = []
        for label in labels:
            r = s["rows"].get(label)
            match = next((q for q in r["prompts"] if q["index"] == index), None) if r else None
            cells.append(None if match is None else {
                "images": [quote(str(i)) for i in match["images"]], "prompt": match["prompt"],
                "scores": " · ".join(f"{DISPLAY_NAMES.get(n, n)} {match['scores'][n]:.3f}" for n in names
                                     if isinstance(match["scores"].get(n), (int, float)))})
        p = prompts[index]
        lines.append({"text": p["metric_prompt"], "kind": KIND_NAMES.get(p["kind"], p["kind"]), "cells": cells})
    first = next((i for p in prompts.values() for i in p["images"]), None)
    return {"name": name, "slug": s["slug"], "class_noun": s["class"], "live": s["live"],
            "references": [quote(str(t)) for t in (s["references"] or {}).get("thumbnails", [])],
            "columns": [{"label": label, "settings": s["rows"][label]["settings"] if label in s["rows"] else ""}
                        for label in labels],
            "pixelated": bool(first) and _small(out / first), "prompts": lines}


def html_report(plan: dict, subjects: dict, table: dict, groups: dict, out: Path) -> str:
    return _environment().get_template("report.html.j2").render(
        title=plan["title"], notes=re.split(r"`([^`]*)`", _notes(plan, subjects)),
        tables=[{"heading": heading, "header": header, "body": body, "numeric": _numeric_columns(header, body)}
                for heading, header, body in tables(plan, subjects, table, groups)],
        pending=pending(plan, subjects),
        subjects=[_subject_grid(plan, name, s, out) for name, s in subjects.items()],
        stamp=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


# -- the PNG grid -----------------------------------------------------------------------------------

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


def write_report(out: str | Path) -> dict[str, Path]:
    """Rewrite results.json, report.md, report.html and the grids in ``out`` from the harness's files."""
    out = Path(out)
    plan, subjects = collect(out)
    groups = label_settings(plan, subjects)
    table = summary(plan, subjects)
    results = {"title": plan["title"], "data": plan.get("data", ""), "settings": groups, "metrics": plan["metrics"],
               "rows": plan["rows"], "table": table, "pending": pending(plan, subjects), "subjects": subjects}
    files = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    grids = {name: png_grid(plan, s, out) for name, s in subjects.items()}
    atomic_write_json(files["json"], results)
    atomic_write_text(files["markdown"], markdown(plan, subjects, table, groups,
                                                  {n: g.relative_to(out) for n, g in grids.items() if g}))
    atomic_write_text(files["html"], html_report(plan, subjects, table, groups, out))
    files.update({f"grid {name}": grid for name, grid in grids.items() if grid})
    return files
