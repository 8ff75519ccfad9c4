"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def build_optimizer(param_groups: list[dict], train, lr: float) -> torch.optim.Optimizer:
    """AdamW from torch, or 8-bit AdamW from bitsandbytes (it runs on CPU tensors too)."""
    kwargs = dict(lr=lr, betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.adam_weight_decay,
                  eps=train.adam_epsilon)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SystemExit("error: train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def build_lr_scheduler(optimizer, train):
    """A schedule stepped once per optimizer step (not per process or micro-batch)."""
    return get_scheduler(train.lr_scheduler, optimizer=optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps)
