#!/usr/bin/env python
"""Ship a trained toy in-context model with the repository, so `personalize zero-shot` and
`personalize demo` work on a fresh machine: its reference-attention weights and config are copied to
personalize/toyworld/assets/toy-incontext-self/ (the default model; --to ships beside it) with a model card
(README.md) naming the training run, and the reference guidance scale chosen for it on validation subjects
(--ref-scale; `python eval/toybench.py --subjects val-0,...,val-5 --rows incontext:RUN --ref-guidance S ...`)
written into its config as ``ref_scale``, the scale generation uses unless told otherwise.

    personalize train toy/incontext-self                         # ~1 h on 2 CPU cores
    python eval/toy_incontext.py --ship outputs/toy-incontext-self --recipe toy/incontext-self --ref-scale 6
    python eval/toybench.py --rows ...,incontext                 # then ToyBench

A model trained in stages (``incontext.init_from``) gets every stage on its card, read from the card or
the run folder of the model it started from.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.incontext.model import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from personalize.incontext.shipped import DEFAULT_MODEL  # noqa: E402
from personalize.workflows.toy_model_card import PRECISION_WORDS  # noqa: E402
from personalize.models.toy import ASSETS  # noqa: E402

TARGET = ASSETS / DEFAULT_MODEL


def stage_line(number: int, config: dict, summary: dict, how: str) -> str:
    train = config.get("train", {})
    options = config.get("incontext", {})
    lora = ""
    if options.get("lora_rank"):
        lora = f", LoRA rank {options['lora_rank']} (learning rate {options.get('lora_learning_rate') or 'the same'})"
    precision = summary.get("mixed_precision", train.get("mixed_precision"))
    precision = PRECISION_WORDS.get(precision, precision)  # "no" -> float32
    query = " with a query of its own (`reference_query: self`)" if options.get("reference_query") == "self" else ""
    return (f"- Stage {number} ({how}): reference attention{query} on the `{', '.join(options.get('blocks', []))}` "
            f"blocks{lora}; {summary.get('steps')} steps of batch {train.get('batch_size')} with "
            f"{options.get('num_references')} examples per target, learning rate "
            f"{train.get('learning_rate')} ({train.get('lr_scheduler')}), {precision}; "
            f"{summary.get('train_seconds', 0) / 60:.0f} min of training on the machine that trained it; final "
            f"logged loss {summary.get('final_loss', float('nan')):.4f}.")


def earlier_stages(options: dict) -> list[str]:
    """The training stages (one line each) of the model a run started from (``incontext.init_from``):
    from its card if it has one (the shipped model), else from its run folder, following its own
    ``init_from`` back to the first stage."""
    import yaml

    start = options.get("init_from")
    if not start:
        return []
    start = Path(start)
    card_file = start / "README.md"
    if card_file.is_file():
        stages = [line for line in card_file.read_text().splitlines() if line.startswith("- Stage ")]
        if stages:
            return stages
    if (start / "config.yaml").is_file() and (start / "run_summary.json").is_file():
        config = yaml.safe_load((start / "config.yaml").read_text())
        before = earlier_stages(config.get("incontext", {}))
        origin = config.get("incontext", {}).get("init_from")
        if origin and (Path(origin) / "run_summary.json").is_file() and \
                (Path(origin) / "run_summary.json").read_bytes() == (start / "run_summary.json").read_bytes():
            return before  # that run was shipped since into the folder it started from: its card lists it already
        summary = json.loads((start / "run_summary.json").read_text())
        return [*before, stage_line(len(before) + 1, config, summary, f"`personalize train`, into `{start}`")]
    return [f"- Stage 1: the model in {start} (no card, no run record)"]


def card(config: dict, summary: dict, recipe: str, earlier: list[str] = (), default: bool = True,
         ref_scale: float | None = None) -> str:
    options = config.get("incontext", {})
    lora = (f"LoRA of rank {options['lora_rank']} on its U-Net" if options.get("lora_rank")
            else "the base frozen")
    stages = [*earlier, stage_line(len(earlier) + 1, config, summary, f"`personalize train {recipe}`")]
    lines = "\n".join(stages)
    use = "this model is the default `--model`" if default else "with `--model` set to this folder"
    examples = f"their {options.get('num_references')} examples"
    per_stage = [re.search(r"with (\d+) examples per target", line) for line in stages]
    if not all(per_stage) or len({m.group(1) for m in per_stage}) > 1:  # stages with other K (or unknown)
        examples = "their examples (how many per target: on each stage's line below)"
    start = Path(options["init_from"]) / CONFIG_NAME if options.get("init_from") else None
    if start is not None and start.is_file():  # a stage may raise K (incontext.init_from)
        before = json.loads(start.read_text()).get("num_references")
        if before != options.get("num_references"):
            examples = (f"their examples ({before} per target in the stages before the last, "
                        f"{options.get('num_references')} in the last)")
    scale = (f"Reference guidance scale {ref_scale:g}, chosen on validation subjects (`ref_scale` in {CONFIG_NAME}: "
             "the scale generation uses unless `--ref-scale` is given)." if ref_scale is not None else
             "No reference guidance scale was chosen for it: generation uses `--ref-scale` or 2.")
    return f"""# Toy in-context model

Reference attention (SuTI / Re-Imagen style, `personalize/incontext/`) trained on the shipped toy base
model (`model.base: toy`), {lora}, with this project's trainer, in the stages listed below.

- Training data: toy-world clusters of {options.get('toyworld_subjects')} training subjects x
  {options.get('toyworld_per_subject')} renders in distinct contexts (`{options.get('manifest')}`); targets
  differ in context from {examples};
  the 12 held-out ToyBench subjects never appear.
{lines}
- {scale}
- ToyBench (subject / prompt fidelity against LoRA and DreamBooth): `docs/toybench.md`.

Use: `personalize zero-shot --refs a.png b.png c.png --ref-captions ... --prompt "a star in the snow"`
({use}), or `InContextPipeline.from_pretrained(THIS_FOLDER, base="toy")`.
"""


def ship(run_dir: Path, recipe: str, target: Path = TARGET, ref_scale: float | None = None) -> Path:
    """Copy ``run_dir``'s in-context model into ``target`` with its card; ``ref_scale``: the reference
    guidance scale chosen for it on validation subjects, written into the shipped config (None: the one
    ``target`` already names, if any, is kept)."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, "run_summary.json", "config.yaml"):
        if not (run_dir / name).is_file():
            raise SystemExit(f"{run_dir}: no {name}; is this the output_dir of a finished `personalize train` run?")
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "run_summary.json").read_text())
    start = config.get("incontext", {}).get("init_from")
    if start and Path(start).resolve() == target.resolve() and (target / WEIGHTS_NAME).is_file() and \
            (target / WEIGHTS_NAME).read_bytes() == (run_dir / WEIGHTS_NAME).read_bytes():
        raise SystemExit(f"{run_dir} is already shipped in {target}, the folder it started from: its card lists this "
                         "run's stage already (shipping it again would list it twice)")
    if summary.get("method") != "incontext":
        raise SystemExit(f"{run_dir}: method {summary.get('method')!r}, not an in-context model")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (WEIGHTS_NAME, "run_summary.json"):
        shutil.copyfile(run_dir / name, tmp / name)
    if ref_scale is None and (target / CONFIG_NAME).is_file():
        ref_scale = json.loads((target / CONFIG_NAME).read_text()).get("ref_scale")
    spec = json.loads((run_dir / CONFIG_NAME).read_text())
    (tmp / CONFIG_NAME).write_text(json.dumps({**spec, "ref_scale": ref_scale}, indent=2))
    (tmp / "README.md").write_text(card(config, summary, recipe, earlier_stages(config.get("incontext", {})),
                                        default=target.resolve() == TARGET.resolve(), ref_scale=ref_scale))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", type=Path, required=True, help="output_dir of a finished toy/incontext run")
    parser.add_argument("--recipe", default="toy/incontext-self", help="the recipe that trained it (for the card)")
    parser.add_argument("--to", type=Path, default=TARGET,
                        help=f"folder to ship into (default {TARGET}: the default model of personalize zero-shot; "
                             "another folder under assets/ ships a second model beside it)")
    parser.add_argument("--ref-scale", type=float, default=None,
                        help="reference guidance scale chosen on validation subjects, written into the shipped "
                             "config (default: keep the one the target folder names, if any)")
    args = parser.parse_args(argv)
    target = ship(args.ship, args.recipe, args.to, args.ref_scale)
    from personalize.incontext.pipeline import InContextPipeline

    InContextPipeline.from_pretrained(str(target), base="toy")  # the shipped copy loads onto the toy model
    print(f"shipped {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
