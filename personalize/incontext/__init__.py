"""The retrieval-augmented in-context model (SuTI / Re-Imagen style): the U-Net's own encoder half
encodes K example image-caption pairs once, and reference attention layers in the U-Net attend to
them, so a new subject needs no fine-tuning. See ../shared/DESIGN.md, "The in-context model"."""

from personalize.incontext.attention import (
    PassReference, ReferenceAttnProcessor, ReferenceFeatures, install_reference_attention, is_installed,
    reference_layer_names, reference_parameters, reference_state_dict,
)
from personalize.incontext.model import (
    InContextLoadError, InContextSpec, encode_references, load_incontext, predict_noise, read_spec, save_incontext,
)

__all__ = [
    "PassReference", "ReferenceAttnProcessor", "ReferenceFeatures", "install_reference_attention", "is_installed",
    "reference_layer_names", "reference_parameters", "reference_state_dict",
    "InContextLoadError", "InContextSpec", "encode_references", "load_incontext", "predict_noise", "read_spec",
    "save_incontext",
]
