"""Train a few rows of a text encoder's input embedding while every other row stays exactly as it was.

Textual Inversion learns the rows of its new placeholder token(s); DreamBooth with
``dreambooth.identifier_token`` learns the row of its rare identifier word beside the U-Net (pivotal
tuning). The optimizer sees the whole embedding matrix (gradients only reach the rows the prompts
use, but weight decay and Adam's momentum would move the others), so after every step the rows that
do not train are copied back from the original.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class TrainableEmbeddingRows:
    """``weight`` returns the live embedding matrix (it may be re-wrapped by accelerate between calls)."""

    def __init__(self, weight: Callable[[], torch.nn.Parameter], token_ids: Sequence[int]):
        self._weight = weight
        self.token_ids = list(token_ids)
        matrix = weight()
        self.frozen_rows = torch.ones(matrix.shape[0], dtype=torch.bool)
        self.frozen_rows[self.token_ids] = False
        self.original = matrix.detach().clone()
        matrix.requires_grad_(True)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self._weight()

    def restore_frozen_rows(self) -> None:
        weight = self.weight
        with torch.no_grad():
            mask = self.frozen_rows.to(weight.device)
            weight[mask] = self.original.to(weight.device, weight.dtype)[mask]

    def learned(self) -> torch.Tensor:
        return self.weight[self.token_ids].detach().float().cpu().contiguous()

    def load(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight[self.token_ids] = rows.to(self.weight)


def input_embedding(encoder) -> torch.nn.Parameter:
    """The token-embedding matrix of a (possibly accelerate-wrapped) text encoder."""
    return getattr(encoder, "module", encoder).get_input_embeddings().weight
