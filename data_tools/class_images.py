"""Generate the class (prior-preservation) images a recipe needs, before training.

    python data_tools/class_images.py recipes/dreambooth-sd15.yaml prior.num_class_images=200

Only the images missing from ``prior.class_images`` are generated; existing ones are kept. The
trainer does the same automatically; this script lets you do it ahead of time (or on another GPU).
"""

import argparse
import sys

from personalize.cli import setup_logging
from personalize.recipes import resolve_recipe
from personalize.errors import USER_ERRORS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe file or shipped recipe name (its prior section is used)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)
    setup_logging()
    from personalize.recipes import load_config
    from personalize.data.class_images import ensure_class_images
    from personalize.models import load_models

    try:
        config = load_config(resolve_recipe(args.recipe), args.overrides)
        if not config.prior.enabled:
            print("prior.enabled is false in this recipe: no class images needed")
            return 0
        made = ensure_class_images(config.prior, load_models(config.model), config.data.resolution,
                                   config.train.seed, args.device)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"generated {made} class images; {config.prior.class_images} now holds {config.prior.num_class_images}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
