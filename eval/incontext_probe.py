"""How much in-context models use their references: reference gain (the relative drop in denoising
loss that the references give) and the normalized entropy of each reference-attention layer
(1 = a uniform average over the reference tokens), on toy-world validation subjects.

    python eval/incontext_probe.py personalize/toyworld/assets/toy-incontext personalize/toyworld/assets/toy-incontext-self
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="in-context model folders (incontext_config.json + weights)")
    parser.add_argument("--base", default="toy", help="base model (default: toy)")
    parser.add_argument("--subjects", type=int, default=24, help="validation subjects val-0.. (default 24)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from personalize.incontext.pipeline import InContextPipeline
    from personalize.evaluation.incontext_probe import probe

    for folder in args.models:
        result = probe(InContextPipeline.from_pretrained(folder, base=args.base), n_subjects=args.subjects)
        if args.json:
            print(json.dumps({"model": folder, **result}))
            continue
        print(f"{folder}: reference gain {result['reference_gain']:.4f} over {args.subjects} validation subjects "
              f"(timesteps {result['timesteps']})")
        for name, value in result["entropy"].items():
            print(f"  {name:60s} entropy {value:.3f}")


if __name__ == "__main__":
    main()
