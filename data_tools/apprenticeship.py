r"""SuTI's apprenticeship data: per cluster an expert (LoRA DreamBooth) generates the subject for new
prompts, the best-scored fraction become in-context targets (see personalize/workflows/apprenticeship.py).

    python data_tools/apprenticeship.py data/toyworld/clusters/manifest.jsonl --out outputs/apprenticeship \
        --recipe toy/lora --metrics toy --max-clusters 12 --guidance 6
    personalize train toy/incontext-apprentice     # the toy in-context model on OUT/manifest.jsonl

A stopped run continues where it stopped (finished clusters are skipped).
"""

import argparse
import sys

from personalize.cli import setup_logging
from personalize.errors import USER_ERRORS


def main(argv=None) -> int:
    from personalize.workflows.apprenticeship import DEFAULT_TEMPLATES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="cluster manifest (JSONL: cluster, file_name, text[, context, class])")
    parser.add_argument("--out", default="outputs/apprenticeship", help="work folder; writes OUT/manifest.jsonl")
    parser.add_argument("--recipe", default="toy/lora", help="the experts' recipe (LoRA DreamBooth)")
    parser.add_argument("--base", help="base model (default: the recipe's)")
    parser.add_argument("--templates", help="file with one prompt template per line ('{}' = the subject); "
                                            f"default: {len(DEFAULT_TEMPLATES)} scenes and accessories")
    parser.add_argument("-n", type=int, default=2, help="images per template")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of the generations kept")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--class-noun", help="class noun for records without a 'class'")
    parser.add_argument("--max-clusters", type=int, help="only the first N clusters (sorted by id)")
    parser.add_argument("--metrics", choices=("toy", "dreambench", "tiny"), default="toy",
                        help="scores: toy judges, DINO + CLIP (dreambench), or tiny random stand-ins")
    parser.add_argument("--dino-weights")
    parser.add_argument("--clip-weights")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for the expert recipe")
    args = parser.parse_args(argv)
    setup_logging()
    from pathlib import Path

    from personalize.workflows.apprenticeship import ApprenticeshipSettings, run_apprenticeship
    from personalize.metrics import load_metrics

    try:
        templates = DEFAULT_TEMPLATES
        if args.templates:
            templates = tuple(t.strip() for t in Path(args.templates).read_text().splitlines() if t.strip())
        settings = ApprenticeshipSettings(out=args.out, expert_recipe=args.recipe, base=args.base, templates=templates,
                                          images_per_prompt=args.n, keep_fraction=args.keep, steps=args.steps,
                                          guidance=args.guidance, class_noun=args.class_noun,
                                          max_clusters=args.max_clusters, overrides=tuple(args.overrides))
        metrics = load_metrics(args.metrics, args.dino_weights, args.clip_weights)
        manifest = run_apprenticeship(args.manifest, settings, metrics)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
