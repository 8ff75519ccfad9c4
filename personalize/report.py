"""The benchmark report, rebuilt from the harness's files: ``results.json``, ``report.md`` and
``report.html`` (tables, and per subject a grid: references | each row's images per prompt).

Everything is read from ``<out>/plan.json``, ``<out>/references/<subject>/result.json`` and
``<out>/<row>/<subject>/result.json``, so any process can rewrite the report at any time; subjects not
finished yet are listed as pending. The HTML refers to images by relative paths and opens from disk.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from personalize.dreambench import KIND_NAMES, KINDS
from personalize.metrics import DISPLAY_NAMES

REAL = "real images"


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def collect(out: Path) -> tuple[dict, dict]:
    """(plan, subjects): each subject with its references result and its finished rows."""
    plan = json.loads((out / "plan.json").read_text())
    subjects = {}
    for s in plan["subjects"]:
        ref_file = out / "references" / s["slug"] / "result.json"
        entry = {**s, "references": json.loads(ref_file.read_text()) if ref_file.is_file() else None, "rows": {}}
        for row in plan["rows"]:
            result_file = out / row["label"] / s["slug"] / "result.json"
            if result_file.is_file():
                entry["rows"][row["label"]] = json.loads(result_file.read_text())
        subjects[s["name"]] = entry
    return plan, subjects


def summary(plan: dict, subjects: dict) -> dict:
    """Per row, the means over subjects (overall and per prompt kind), times and peak memory; the
    real-images row first (references against each other: image metrics only)."""
    names = plan["metrics"]
    table = {}
    real = [s["references"]["scores"] for s in subjects.values() if s["references"]]
    if real and any(real):
        table[REAL] = {"mean": {k: _mean([r.get(k) for r in real]) for k in names}, "kinds": {},
                       "subjects": len(real)}
    for row in plan["rows"]:
        label = row["label"]
        results = [s["rows"][label] for s in subjects.values() if label in s["rows"]]
        if not results:
            continue
        kinds = {}
        for kind in KINDS:
            having = [r["kinds"][kind] for r in results if kind in r["kinds"]]
            if having:
                kinds[kind] = {k: _mean([h[k] for h in having]) for k in names}
        table[label] = {
            "mean": {k: _mean([r["mean"][k] for r in results]) for k in names}, "kinds": kinds,
            "subjects": len(results), "train_seconds": _mean([r["train_seconds"] for r in results]),
            "generate_seconds": _mean([r["generate_seconds"] for r in results]),
            "peak_memory_train_mib": max((r["peak_memory_train_mib"] or 0 for r in results), default=0) or None,
            "peak_memory_generate_mib": max(r["peak_memory_generate_mib"] for r in results),
            "memory": results[0]["memory"],
            "copy_paste_rate": _mean([r.get("copy_paste_rate") for r in results]),
        }
        drifts = [r["drift"] for r in results if r.get("drift")]
        if drifts:
            table[label]["drift"] = {metric: {k: _mean([d[metric][k] for d in drifts if metric in d])
                                              for k in ("to_subject", "among_themselves")}
                                     for metric in drifts[0]}
    return table


def pending(plan: dict, subjects: dict) -> list[str]:
    return [f"{row['label']}/{name}" for name, s in subjects.items() for row in plan["rows"]
            if row["label"] not in s["rows"]]


# -- tables (one description, written as markdown and as HTML) ------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tables(plan: dict, subjects: dict, table: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, body) of each table of the report."""
    names = plan["metrics"]
    cols = [DISPLAY_NAMES.get(k, k) for k in names]
    mean_rows = []
    for label, e in table.items():
        times = [_fmt(e.get("train_seconds"), 1), _fmt(e.get("generate_seconds"), 1),
                 _fmt(e.get("peak_memory_train_mib"), 0), _fmt(e.get("peak_memory_generate_mib"), 0)]
        mean_rows.append([label, str(e["subjects"]), *[_fmt(e["mean"][k]) for k in names],
                          _fmt(e.get("copy_paste_rate"), 2), *(times if label != REAL else ["–"] * 4)])
    memory = next((e["memory"] for e in table.values() if "memory" in e), "")
    out = [("Mean over subjects", ["row", "subjects", *cols, "copy-paste", "train s", "generate s",
                                    "peak train MiB", "peak generate MiB"], mean_rows)]
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
            subject_rows.append([name, s["class"], REAL, *[_fmt(s["references"]["scores"].get(k)) for k in names],
                                 "–", "–", "–"])
        for label, r in s["rows"].items():
            peak = f"{_fmt(r['peak_memory_train_mib'], 0)} / {_fmt(r['peak_memory_generate_mib'], 0)}"
            subject_rows.append([name, s["class"], label, *[_fmt(r["mean"][k]) for k in names],
                                 _fmt(r["train_seconds"], 1), _fmt(r["generate_seconds"], 1), peak])
    out.append(("By subject", ["subject", "class", "row", *cols, "train s", "generate s",
                               "peak MiB train / generate"], subject_rows))
    if memory:
        out[0] = (out[0][0] + f" (peak memory: {memory})", *out[0][1:])
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
    s = plan["settings"]
    live = sum(1 for x in subjects.values() if x["live"])
    prompts = sorted({x["prompts"] for x in subjects.values()})
    text = (f"{len(subjects)} subjects ({live} live), {'/'.join(map(str, prompts))} prompts x "
            f"{s['images_per_prompt']} images, seeds {s['seed']}..{s['seed'] + s['images_per_prompt'] - 1}, "
            f"{s['steps']} sampling steps, guidance {s['guidance']}. Image metrics: mean cosine over all "
            f"(generated, real) pairs of a subject; text metrics: image vs the prompt with the class noun and no "
            f"unique token. The real-images row compares each subject's photos with each other. Copy-paste: the "
            f"fraction of images that are near-duplicates of a reference (PSNR >= 20 dB at 32 px).")
    if plan.get("data"):
        text = f"Data: `{plan['data']}`. " + text
    def extra(r: dict) -> str:  # the row's own overrides (model.base is shown as "on ...")
        own = [o for o in r.get("overrides", []) if not o.startswith("model.base=")]
        return f" ({', '.join(own)})" if own else ""

    rows = "; ".join(f"{r['label']}: {r['kind']}" + (f" with `{Path(r['recipe']).name}`" if r.get("recipe") else "")
                     + extra(r) + (f" on `{r['base']}`" if r.get("base") else "") for r in plan["rows"])
    if any(r.get("method") == "incontext" for r in plan["rows"]):
        k = s.get("references") or "as many as the model was trained with"
        interval = s.get("ref_interval")
        where = f" at noise levels {interval[0]}..{interval[1]} of the schedule (1 elsewhere)" if interval else ""
        scale = s.get("ref_guidance")
        if scale is None:  # each model's own (the ref_scale it was shipped with)
            scale = "each model's own (" + ", ".join(f"{r['label']}: {r.get('ref_scale')}" for r in plan["rows"]
                                                     if r.get("method") == "incontext") + ")"
        text += f" In-context rows: reference guidance {scale}{where}, references per subject: {k}."
    return text + f" Rows: {rows}."


def markdown(plan: dict, subjects: dict, table: dict, grids: Optional[dict[str, Path]] = None) -> str:
    parts = [f"# {plan['title']}", "", _notes(plan, subjects), ""]
    for heading, header, body in tables(plan, subjects, table):
        parts += [f"## {heading}", "", _markdown_table(header, body), ""]
    if grids:
        rows = ", ".join(r["label"] for r in plan["rows"])
        parts += ["## Images", "", f"First line: the references; then one line per row ({rows}), the first image "
                  "of each prompt.", ""]
        parts += [f"![{name}]({quote(grid.as_posix())})" for name, grid in grids.items()] + [""]
    waiting = pending(plan, subjects)
    if waiting:
        parts += [f"Pending ({len(waiting)}): {', '.join(waiting)}", ""]
    return "\n".join(parts)


# -- HTML -----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{margin-bottom:4px} .notes{color:#555;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 24px} th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.grid td{padding:4px} .refs{position:sticky;top:0}
.imgs{display:flex;gap:3px;flex-wrap:wrap;max-width:420px} .imgs img,.refs img{width:96px;height:96px;object-fit:cover}
img.px{image-rendering:pixelated} .score{font-size:12px;color:#444;margin-top:2px}
.kind{font-size:12px;color:#777} .pending{color:#b00}
"""


def _html_table(header: list[str], body: list[list[str]]) -> str:
    numeric = _numeric_columns(header, body)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td{' class=num' if numeric[i] else ''}>{html.escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _img(path: str, css: str = "", title: str = "") -> str:
    return f"<img src='{html.escape(quote(path))}' class='{css}' loading='lazy' alt='' title='{html.escape(title)}'>"


def _subject_grid(plan: dict, name: str, s: dict, out: Path) -> str:
    names = plan["metrics"]
    labels = [r["label"] for r in plan["rows"]]
    prompts = {}
    for r in s["rows"].values():
        for p in r["prompts"]:
            prompts.setdefault(p["index"], p)
    title = f"{name} <span class='kind'>({html.escape(s['class'])}{', live subject' if s['live'] else ''})</span>"
    if not prompts:
        return f"<h2 id='{html.escape(s['slug'])}'>{title}</h2><p class='pending'>no row finished yet</p>"
    first = next(iter(prompts.values()))["images"][0]
    css = "px" if _small(out / first) else ""
    refs = "".join(_img(t) for t in (s["references"] or {}).get("thumbnails", []))
    head = "<tr><th>references</th><th>prompt</th>" + "".join(f"<th>{html.escape(l)}</th>" for l in labels) + "</tr>"
    body = []
    for k, index in enumerate(sorted(prompts)):
        p = prompts[index]
        cells = []
        for label in labels:
            r = s["rows"].get(label)
            match = next((q for q in r["prompts"] if q["index"] == index), None) if r else None
            if match is None:
                cells.append("<td class='pending'>pending</td>")
                continue
            scores = " · ".join(f"{DISPLAY_NAMES.get(n, n)} {match['scores'][n]:.3f}" for n in names)
            images = "".join(_img(i, css, match["prompt"]) for i in match["images"])
            cells.append(f"<td><div class='imgs'>{images}</div>"
                         f"<div class='score'>{html.escape(scores)}</div></td>")
        ref_cell = (f"<td rowspan='{len(prompts)}'><div class='refs imgs' style='max-width:200px'>{refs}</div></td>"
                    if k == 0 else "")
        body.append(f"<tr>{ref_cell}<td>{html.escape(p['metric_prompt'])}<br>"
                    f"<span class='kind'>{html.escape(KIND_NAMES[p['kind']])}</span></td>{''.join(cells)}</tr>")
    return f"<h2 id='{html.escape(s['slug'])}'>{title}</h2><table class='grid'>{head}{''.join(body)}</table>"


def _small(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return max(image.size) <= 128
    except OSError:
        return False


def html_report(plan: dict, subjects: dict, table: dict, out: Path) -> str:
    notes = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(_notes(plan, subjects)))
    parts = [f"<h1>{html.escape(plan['title'])}</h1><p class='notes'>{notes}</p>"]
    for heading, header, body in tables(plan, subjects, table):
        parts.append(f"<h3>{html.escape(heading)}</h3>{_html_table(header, body)}")
    waiting = pending(plan, subjects)
    if waiting:
        parts.append(f"<p class='pending'>Pending ({len(waiting)}): {html.escape(', '.join(waiting))}</p>")
    links = " · ".join(f"<a href='#{html.escape(s['slug'])}'>{html.escape(n)}</a>" for n, s in subjects.items())
    parts.append(f"<p>Subjects: {links}</p>")
    parts += [_subject_grid(plan, name, s, out) for name, s in subjects.items()]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(plan['title'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}<p class='kind'>written {stamp}</p></body></html>")


def png_grid(plan: dict, s: dict, out: Path, cell: int = 96) -> Optional[Path]:
    """``grids/<subject>.png``: the references on the first line, then one line per finished row with
    the first image of each prompt, in prompt order (``cell`` px squares; small images scale up sharply)."""
    from PIL import Image

    lines = [[out / t for t in (s["references"] or {}).get("thumbnails", [])]]
    for row in plan["rows"]:
        r = s["rows"].get(row["label"])
        if r:
            lines.append([out / p["images"][0] for p in sorted(r["prompts"], key=lambda p: p["index"]) if p["images"]])
    lines = [line for line in lines if line]
    if len(lines) < 2:
        return None
    with Image.open(lines[0][0]) as first:  # small images (the toy world's 64 px) stay at their own size
        cell = min(cell, max(first.size))
    width = max(len(line) for line in lines)
    grid = Image.new("RGB", (cell * width, cell * len(lines)), "white")
    for y, line in enumerate(lines):
        for x, path in enumerate(line):
            with Image.open(path) as image:
                small = max(image.size) <= cell
                tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST if small
                                                   else Image.Resampling.LANCZOS)
            grid.paste(tile, (cell * x, cell * y))
    path = out / "grids" / f"{s['slug']}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out: str | Path) -> dict[str, Path]:
    """Rewrite results.json, report.md and report.html in ``out`` from the harness's files."""
    out = Path(out)
    plan, subjects = collect(out)
    table = summary(plan, subjects)
    results = {"title": plan["title"], "data": plan["data"], "settings": plan["settings"], "metrics": plan["metrics"],
               "rows": plan["rows"], "table": table, "pending": pending(plan, subjects), "subjects": subjects}
    files = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    grids = {name: png_grid(plan, s, out) for name, s in subjects.items()}
    _write(files["json"], json.dumps(results, indent=2))
    _write(files["markdown"], markdown(plan, subjects, table, {n: g.relative_to(out) for n, g in grids.items() if g}))
    _write(files["html"], html_report(plan, subjects, table, out))
    files.update({f"grid {name}": grid for name, grid in grids.items() if grid})
    return files
