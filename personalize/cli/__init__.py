"""The ``personalize`` command: train, generate, recipes.

    personalize train RECIPE [section.key=value ...]
    personalize generate --base MODEL [--lora DIR] [--embeddings FILE --token T] --prompt "..." -n 4
    personalize eval RECIPE|base [...] --data DREAMBENCH_FOLDER | --toy SUBJECTS   (see docs/evaluation.md)
    personalize zero-shot --refs a.png b.png c.png --prompt "..."   (in-context model, no training)
    personalize recipes
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

# errors of the file system that are the user's to fix (full disk, read-only, no permission, ...)
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                   errno.EISDIR, errno.ENAMETOOLONG}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "accelerate", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_train(args) -> int:
    from personalize.recipes import load_config, resolve_recipe

    # a bad recipe is refused before the trainer (torch, diffusers) loads
    config = load_config(resolve_recipe(args.recipe), args.overrides)
    from personalize.training.trainer import Trainer

    out = Trainer(config).train()
    print(f"done: {out}")
    return 0


def cmd_generate(args) -> int:
    from personalize.cli.generate import run

    return run(args)


def cmd_demo(args) -> int:
    from personalize.workflows.demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    choices = ("incontext", "lora", "textual_inversion", "dreambooth")
    unknown = sorted(set(methods) - set(choices))
    if unknown:
        print(f"error: --methods: unknown {', '.join(unknown)}; choose from {', '.join(choices)}", file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"error: -n: must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    run_demo(Path(args.out), args.subject, methods, args.n, args.class_noun, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    from personalize.cli.eval import run

    return run(args)


def cmd_zero_shot(args) -> int:
    from personalize.cli.zero_shot import run

    return run(args)


def cmd_recipes(args) -> int:
    from personalize.recipes import RECIPES_DIR, shipped_recipes

    for path in shipped_recipes():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{str(path.relative_to(RECIPES_DIR).with_suffix('')):28s} {first}")
    return 0


def _add_module_command(sub, name: str, module, func, help: str) -> None:
    """A subcommand whose description (its docstring) and options (its ``add_arguments``) live in ``module``."""
    p = sub.add_parser(name, help=help, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from personalize.cli import eval as cli_eval, generate as cli_generate, zero_shot as cli_zero_shot

    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a recipe (same as `accelerate launch -m personalize.train`)",
                       description="Train with a YAML recipe. Overrides use dotted keys: train.max_steps=400 "
                                   "lora.rank=8. Multi-GPU: accelerate launch -m personalize.train RECIPE ...")
    p.add_argument("recipe", help="recipe file, or a shipped recipe name (see `personalize recipes`)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_train)

    _add_module_command(sub, "generate", cli_generate, cmd_generate,
                        help="generate images with a base model + LoRA / embeddings / DreamBooth output")

    p = sub.add_parser("demo", help="personalize the shipped toy model to a subject with each method and report",
                       description="The toy-world demo (no download, CPU): takes a held-out toy subject (or "
                                   "your folder of images), generates it in new scenes with the shipped in-context "
                                   "model (no training) and after personalizing the toy model with LoRA, Textual "
                                   "Inversion and DreamBooth, and writes a report with subject and prompt fidelity "
                                   "of base vs each method.")
    p.add_argument("--subject", default=None,
                   help="a held-out toy subject name (default: zorbo) or a folder of your own images")
    p.add_argument("--methods", default="incontext,lora,textual_inversion,dreambooth",
                   help="comma-separated: incontext (the shipped in-context model, no training), lora, "
                        "textual_inversion, dreambooth")
    p.add_argument("-n", type=int, default=1, help="images per prompt (ToyBench: 2)")
    p.add_argument("--class-noun", default="star", help="class noun of your own subject (folder mode)")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="run again into an --out that holds a finished demo (its results are reused where the "
                        "settings match, the report is rewritten)")
    p.set_defaults(func=cmd_demo)

    _add_module_command(sub, "eval", cli_eval, cmd_eval,
                        help="DreamBench table (DINO, CLIP-I, CLIP-T) or ToyBench for any method, with reports")

    _add_module_command(sub, "zero-shot", cli_zero_shot, cmd_zero_shot,
                        help="generate a subject from reference photos with an in-context model")

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from personalize.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: out of memory in `personalize {args.command}`; lower the batch size or resolution",
              file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        print(f"error: {err.strerror}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
