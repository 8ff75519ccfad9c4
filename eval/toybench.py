#!/usr/bin/env python
"""ToyBench: DreamBench's protocol on held-out toy-world subjects, scored by the toy judges, on the
evaluation harness (personalize.evaluation.harness; `personalize eval ... --toy NAMES` reaches the same harness).

For each selected held-out subject, each method personalizes the shipped toy model on 4 reference
renders (with the recipes in recipes/toy/), generates 20 prompts x N images with fixed seeds, and the
judges score subject fidelity and prompt fidelity; rows base and ceiling (real renders) are added, and
language drift (the bare class prompt after personalization) for every row with a model.
A stopped run resumes: (subject, row) pairs finished with the same settings are skipped, others made again.

    python eval/toybench.py                                  # docs/toybench.md: all 12 held-out subjects
    python eval/toybench.py --subjects zorbo --rows lora     # one subject, one row
    python eval/toybench.py --subjects val-0,val-1 --rows incontext --ref-guidance 5 --out outputs/toybench-val --doc ''
                                     # choose a setting on validation subjects, not on the held-out ones
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.errors import UserError  # noqa: E402
from personalize.cli.eval import add_reference_arguments  # noqa: E402
from personalize.evaluation.toybench import ROWS, run_toybench  # noqa: E402
from personalize.toyworld.world import HELDOUT_NAMES, is_validation_name  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", default=",".join(HELDOUT_NAMES),
                        help=f"comma-separated held-out subjects (all: {','.join(HELDOUT_NAMES)}), or validation "
                             "subjects val-0, val-1, ... (trained on by nothing either; for choosing settings)")
    parser.add_argument("--rows", default="base,textual_inversion,lora,dreambooth,incontext,ceiling",
                        help=f"comma-separated, from {','.join(ROWS)} and incontext[_LABEL][:FOLDER] (in-context "
                             "models; FOLDER default: the shipped toy one)")
    parser.add_argument("-n", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (in-context: text)")
    parser.add_argument("--ref-guidance", type=float, default=None,
                        help="in-context rows: reference guidance scale (default: each model's own, the ref_scale "
                             "it was shipped with: 6 for the default toy-incontext-self, 4 for toy-incontext)")
    parser.add_argument("--bf16", action="store_true", help="in-context rows: sample under bfloat16 autocast")
    add_reference_arguments(parser)
    parser.add_argument("--drift-images", type=int, default=8, help="class-prompt images per row for language drift")
    parser.add_argument("--caption-references", action=argparse.BooleanOptionalAction, default=True,
                        help="fine-tune rows train on each reference's own caption with the subject named "
                             "(\"a sks ring on the grass\") instead of one instance prompt")
    parser.add_argument("--out", default="outputs/toybench", help="work folder (images, per-subject results)")
    parser.add_argument("--doc", default="docs/toybench.md", help="markdown report written here ('' = none)")
    args = parser.parse_args(argv)
    subjects = [s for s in args.subjects.split(",") if s]
    rows = [r for r in args.rows.split(",") if r]
    bad = [s for s in subjects if s not in HELDOUT_NAMES and not is_validation_name(s)] + [r for r in rows if r not in ROWS
                                                             and not r.startswith("incontext")]
    if bad:
        parser.error(f"unknown subject or row: {', '.join(bad)}")
    command = "python eval/toybench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        files = _run(args, subjects, rows, command)
    except UserError as err:  # a setting, subject or output folder this run cannot use: the message says which
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text())
    return 0


def _run(args, subjects: list[str], rows: list[str], command: str) -> dict:
    return run_toybench(subjects, rows, Path(args.out), n=args.n, steps=args.steps, drift_images=args.drift_images,
                        guidance=args.guidance, ref_guidance=args.ref_guidance, bf16=args.bf16,
                        references=args.references, ref_interval=args.ref_interval,
                        caption_references=args.caption_references,
                        doc=Path(args.doc) if args.doc else None, command=command.strip())


if __name__ == "__main__":
    sys.exit(main())
