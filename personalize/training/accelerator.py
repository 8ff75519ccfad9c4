"""What the trainer needs from Accelerate beyond ``Accelerator`` itself: a fresh process-wide state per
trainer, and joining several CPU-only processes into one gloo group."""

from __future__ import annotations

import os

import torch


def fresh_accelerator_state() -> None:
    """Accelerate keeps precision and accumulation in process-wide singletons; a second Trainer in the
    same process (the demo, the tests) must be able to choose its own. The process group stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def multi_process_without_accelerator() -> bool:
    """torchrun (or mpirun) with several processes on a machine without GPU/XPU/...: accelerate joins
    them into a gloo process group only when told ``cpu=True`` (``accelerate launch --cpu`` says so
    through ACCELERATE_USE_CPU); without it every rank silently trains alone."""
    world = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if world <= 1:
        return False
    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()
