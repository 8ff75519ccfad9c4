"""The retrieval-augmented in-context model (SuTI / Re-Imagen style): the U-Net's own encoder half
encodes K example image-caption pairs once, and reference attention layers in the U-Net attend to
them, so a new subject needs no fine-tuning. See ../shared/DESIGN.md, "The in-context model".

The names below load on first use (PEP 562), so that importing a light module of this package (the
command line's :mod:`personalize.incontext.shipped`) does not import torch and diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "attention": ["PassReference", "ReferenceAttnProcessor", "ReferenceFeatures", "install_reference_attention",
                  "is_installed", "reference_layer_names", "reference_parameters", "reference_state_dict"],
    "model": ["InContextLoadError", "InContextSpec", "encode_references", "load_incontext", "predict_noise",
              "read_spec", "save_incontext"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"personalize.incontext.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'personalize.incontext' has no attribute {name!r}")
