"""personalize: subject-driven personalization of text-to-image diffusion models.

DreamBooth, LoRA, Textual Inversion and text-to-image fine-tuning on one trainer over Accelerate.
"""

__version__ = "0.1.0"
