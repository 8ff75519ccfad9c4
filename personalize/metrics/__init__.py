"""The metrics a benchmark scores with (:func:`load_metrics`): DreamBench's DINO + CLIP
(:mod:`.encoders`), ToyBench's judges (:mod:`.toy`), or tiny random stand-ins; all behind
:class:`~personalize.metrics.base.SubjectMetrics`."""

from __future__ import annotations

from typing import Optional

from personalize.metrics.base import (
    CLIP_FILES, CLIP_MODEL, CLIP_REPO, DINO_REPO, DISPLAY_NAMES, PICKLE_SUFFIXES, as_pil, copy_paste_rate,
    metric_names, MetricWeightsError, pairwise_cosine, SubjectMetrics,
)
from personalize.metrics.encoders import (
    TINY_CLIP_CONFIG, ClipMetric, dino_transform, DinoMetric, resolve_weights, tiny_clip, tiny_dino,
)

__all__ = [
    "CLIP_FILES", "CLIP_MODEL", "CLIP_REPO", "ClipMetric", "DINO_REPO", "DISPLAY_NAMES", "DinoMetric",
    "METRIC_SETS", "MetricWeightsError", "PICKLE_SUFFIXES", "SubjectMetrics", "TINY_CLIP_CONFIG", "as_pil",
    "copy_paste_rate", "dino_transform", "load_metrics", "metric_names", "pairwise_cosine", "resolve_weights",
    "tiny_clip", "tiny_dino",
]


# -- building the metrics a benchmark asks for ------------------------------------------------------

METRIC_SETS = ("dreambench", "toy", "tiny")


def load_metrics(kind: str = "dreambench", dino_weights: Optional[str] = None, clip_weights: Optional[str] = None,
                 judges: Optional[str] = None, device=None, allow_pickle: bool = False) -> list[SubjectMetrics]:
    """DreamBench's DINO + CLIP metrics, the toy-world judges, or tiny random stand-ins of DINO + CLIP
    (``tiny``: the same code paths offline, meaningless numbers). Every missing weight file is named in
    one error; ``allow_pickle``: the user trusts pickled DINO / CLIP weights."""
    if kind == "toy":
        from personalize.metrics.toy import ToyJudgeMetrics

        return [ToyJudgeMetrics.load(judges)]
    if kind == "tiny":
        return [tiny_dino(device=device), tiny_clip(device=device)]
    if kind != "dreambench":
        raise ValueError(f"unknown metric set {kind!r}; choose from {', '.join(METRIC_SETS)}")
    metrics, errors = [], []
    for load in (lambda: DinoMetric.load(dino_weights, device, allow_pickle),
                 lambda: ClipMetric.load(clip_weights, device=device, allow_pickle=allow_pickle)):
        try:
            metrics.append(load())
        except MetricWeightsError as err:
            errors.append(str(err))
    if errors:
        raise MetricWeightsError("\n".join(errors))
    return metrics
