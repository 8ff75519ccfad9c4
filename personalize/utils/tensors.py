"""Torch helpers shared by layers that do not know each other (metrics, cluster building)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False) -> float:
    """Mean cosine over all pairs (a_i, b_j); ``exclude_self`` (a is b) leaves out the pairs i == j."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    sims = a @ b.T
    if exclude_self:
        if len(a) < 2:
            raise ValueError("need at least two images to compare distinct pairs")
        sims = sims[~torch.eye(len(a), dtype=torch.bool)]
    return float(sims.mean())
