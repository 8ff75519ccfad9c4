"""personalize: subject-driven personalization of text-to-image diffusion models.

DreamBooth, LoRA, Textual Inversion and text-to-image fine-tuning on one trainer over Accelerate.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs a warning at import on CPU-only machines about an optional 4-bit kernel package;
# personalize never uses 4-bit kernels, so drop exactly that message and keep everything else.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in record.getMessage())
