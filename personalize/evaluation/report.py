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
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from personalize.errors import DataError
from personalize.evaluation.grid import png_grid
from personalize.evaluation.settings_text import REAL, by_settings, label_settings
from personalize.evaluation.subjects import KIND_NAMES, KINDS
from personalize.metrics import DISPLAY_NAMES
from personalize.utils.files import atomic_write_json, atomic_write_text

PLAN = "plan.json"
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
    groups = by_settings(real)
    for sid, group in groups.items():
        table[REAL if len(groups) == 1 else f"{REAL} [{sid}]"] = {
            "row": REAL, "settings": sid, "kinds": {}, "subjects": len(group),
            "mean": {k: _mean([r["scores"].get(k) for r in group]) for k in names}}
    for row in plan["rows"]:
        label = row["label"]
        groups = by_settings([s["rows"][label] for s in subjects.values() if label in s["rows"]])
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
