"""JSONL files of records (one JSON object per line), read with every bad line named by its number.

Four readers share this: training metadata (:func:`personalize.data.datasets.jsonl_examples`), the
in-context cluster manifest, the cluster builder's input and the retrieval collection. Each gives a
``parse`` function for one record; the reading, blank-line skipping and error wording live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def parse_jsonl(path: str | Path, parse: Callable[[dict, int], T]) -> tuple[list[T], list[tuple[int, str]]]:
    """``parse(record, line number)`` for every non-blank line of ``path``; returns the parsed items and,
    for each line that is not a JSON object or that ``parse`` rejects (``KeyError``: a missing key;
    ``ValueError``, ``TypeError`` or ``AttributeError``: its message), ``(line number, what is wrong)``."""
    items, bad = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((number, f"not JSON: {err}"))
            continue
        if not isinstance(record, dict):
            bad.append((number, f"a record is a JSON object, got {type(record).__name__}"))
            continue
        try:
            items.append(parse(record, number))
        except KeyError as err:
            bad.append((number, f"missing {err}"))
        except (ValueError, TypeError, AttributeError) as err:
            bad.append((number, str(err)))
    return items, bad
