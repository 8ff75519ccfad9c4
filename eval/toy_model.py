#!/usr/bin/env python
"""Measure the toy base model (VAE PSNR on held-out renders; prompt read-back by the attribute judge
on random captions, with real renders as the ceiling) and write its model card: the README.md beside
the weights and docs/toy-model.md. With --ship, first store a trained pipeline folder there in fp16.

    python eval/toy_model.py --ship outputs/toy-base   # after `personalize train toy/vae` and `toy/base`
    python eval/toy_model.py                           # re-measure the shipped model
    python eval/toy_model.py --card-only               # rewrite the card from the stored measurements
    python eval/toy_model.py --card-only --compare-vae outputs/toy-vae-decoder/vae   # + a VAE not shipped
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.workflows.toy_model_card import RUNS_NAME, _run_info, measure, measure_vae_candidate, model_card, ship  # noqa: E402
from personalize.models.toy import TOY_MODEL_DIR  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", type=Path, help="trained pipeline folder to store (fp16) as the shipped toy model")
    parser.add_argument("--vae-run", type=Path, default=Path("outputs/toy-vae"), help="output_dir of toy/vae")
    parser.add_argument("--base-run", type=Path, default=Path("outputs/toy-base"), help="output_dir of toy/base")
    parser.add_argument("--continue-run", type=Path, default=Path("outputs/toy-base-continue"),
                        help="output_dir of toy/base-continue")
    parser.add_argument("-n", type=int, default=200, help="random captions for the prompt read-back")
    parser.add_argument("--doc", type=Path, default=Path("docs/toy-model.md"))
    parser.add_argument("--compare-vae", type=Path, action="append", default=[], metavar="FOLDER",
                        help="also measure this VAE folder (not shipped) on the same renders and list it on the card")
    parser.add_argument("--card-only", action="store_true",
                        help="do not measure: rewrite the card from the shipped measurements.json")
    args = parser.parse_args(argv)
    if args.ship and args.card_only:
        parser.error("--ship stores new weights, which must be measured: leave out --card-only")
    if args.ship:
        print(f"shipped {ship(args.ship)}")
    stored_file = TOY_MODEL_DIR / "measurements.json"
    stored = json.loads(stored_file.read_text()) if stored_file.is_file() else {}
    if args.card_only:
        if not stored:
            parser.error(f"--card-only: {stored_file} is missing; measure first (leave out --card-only)")
        measured = stored
    else:
        measured = measure(TOY_MODEL_DIR, n_captions=args.n)
        print(json.dumps(measured, indent=2))
    for folder in args.compare_vae:
        if not (folder / "config.json").is_file():
            parser.error(f"--compare-vae {folder}: not a VAE folder (no config.json)")
    # candidates measured before (their folders may be gone) stay on the card unless measured again now
    again = {str(folder) for folder in args.compare_vae}
    earlier = [c for c in stored.get("vae_candidates", []) if c["folder"] not in again]
    new = [measure_vae_candidate(folder) for folder in args.compare_vae]
    if new:
        print(json.dumps(new, indent=2))
    if earlier or new:
        measured["vae_candidates"] = earlier + new
    runs = TOY_MODEL_DIR / RUNS_NAME
    info = json.loads(runs.read_text()) if runs.is_file() else {"vae": {}, "base": {}}
    for key, run_dir in (("vae", args.vae_run), ("base", args.base_run), ("continue", args.continue_run)):
        if (run_dir / "run_summary.json").is_file():
            info[key] = _run_info(run_dir)
    runs.write_text(json.dumps(info, indent=2))
    card = model_card(measured, info["vae"], info["base"], continue_run=info.get("continue"))
    (TOY_MODEL_DIR / "README.md").write_text(card)
    (TOY_MODEL_DIR / "measurements.json").write_text(json.dumps(measured, indent=2))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(card)
    print(f"wrote {TOY_MODEL_DIR / 'README.md'} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
