"""The shipped toy in-context models (a light module: the command line names the default in its help)."""

from __future__ import annotations

from pathlib import Path

TOY_ASSETS = Path(__file__).resolve().parents[1] / "toyworld" / "assets"

# the shipped toy in-context model used when --model is not given (under personalize/toyworld/assets/): the
# own-query model, which meets ToyBench's bar against LoRA and DreamBooth at its reference scale 6
# (docs/toybench.md); the shared-query model beside it, toy-incontext, stays shipped for comparison
DEFAULT_MODEL = "toy-incontext-self"


def default_model() -> Path:
    """The shipped default in-context model's folder (``personalize zero-shot``, the demo, ToyBench)."""
    from personalize.incontext.model import CONFIG_NAME, InContextLoadError

    path = TOY_ASSETS / DEFAULT_MODEL
    if not (path / CONFIG_NAME).is_file():
        raise InContextLoadError(f"no in-context model given and the shipped toy one is not in {path}; train one "
                                 "with `personalize train toy/incontext-self` and pass --model "
                                 "outputs/toy-incontext-self")
    return path
