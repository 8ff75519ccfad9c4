"""What a report's numbers were made with: settings ids (S1, S2, ...) grouping results made alike, and the
words the tables use for each id (:func:`settings_text`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from personalize.utils.trees import flatten
from personalize.metrics import DISPLAY_NAMES

REAL = "real images"  # the row of the subject's own photos
SUBJECT_OWN = ("prompt_templates", "references")  # parts of made_with that differ by subject, not by setting


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
            a, b = flatten(groups[twin]["made_with"] or {}), flatten(group["made_with"] or {})
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


def by_settings(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r.get("settings", "?"), []).append(r)
    return groups
