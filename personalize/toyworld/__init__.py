"""The toy world: procedural scenes, subjects, prompts, the embedded default model and its judges."""

from personalize.toyworld.world import (
    ACCESSORIES, CLASSES, COLORS, PATTERNS, SCENES, SIZES, ImageSpec, Subject, caption, heldout_subjects,
    render, render_many, sample_spec, training_subject,
)

__all__ = ["ACCESSORIES", "CLASSES", "COLORS", "PATTERNS", "SCENES", "SIZES", "ImageSpec", "Subject", "caption",
           "heldout_subjects", "render", "render_many", "sample_spec", "training_subject"]
