#!/usr/bin/env python
"""Ship a trained toy in-context model with the repository, so `personalize zero-shot` and
`personalize demo` work on a fresh machine: its reference-attention weights and config are copied to
personalize/toyworld/assets/toy-incontext/ with a model card (README.md) naming the training run.

    personalize train toy/incontext                              # ~1 h on 2 CPU cores
    python eval/toy_incontext.py --ship outputs/toy-incontext    # then ToyBench: python eval/toybench.py --rows ...,incontext
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.incontext.model import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from personalize.toyworld.model import ASSETS  # noqa: E402

TARGET = ASSETS / "toy-incontext"


def earlier_stages(options: dict) -> str:
    """The training stages (one line each) of the model this run started from (``incontext.init_from``),
    read from its card."""
    start = options.get("init_from")
    if not start:
        return ""
    previous = Path(start) / "README.md"
    text = previous.read_text() if previous.is_file() else ""
    stages = [line for line in text.splitlines() if line.startswith("- Stage ")]
    return "\n".join(stages or [f"- Stage 1: the model in {start} (no card)"]) + "\n"


def card(config: dict, summary: dict, recipe: str, earlier: str = "") -> str:
    train = config.get("train", {})
    options = config.get("incontext", {})
    minutes = summary.get("train_seconds", 0) / 60
    stage = earlier.count("- Stage ") + 1
    return f"""# Toy in-context model

Reference attention (SuTI / Re-Imagen style, `personalize/incontext/`) trained on the shipped toy base
model (`model.base: toy`, frozen) with this project's trainer, in the stages listed below.

- Training data: toy-world clusters of {options.get('toyworld_subjects')} training subjects x
  {options.get('toyworld_per_subject')} renders in distinct contexts (`{options.get('manifest')}`); targets
  differ in context from their {options.get('num_references')} examples; the 12 held-out ToyBench subjects never appear.
- Layers: reference attention on the `{', '.join(options.get('blocks', []))}` blocks; base frozen
  (LoRA rank: {options.get('lora_rank')}).
{earlier}- Stage {stage} (`personalize train {recipe}`): {summary.get('steps')} steps of batch {train.get('batch_size')}, learning rate {train.get('learning_rate')} ({train.get('lr_scheduler')}), {train.get('mixed_precision')}; {minutes:.0f} min of training on the machine that trained it; final logged loss {summary.get('final_loss', float('nan')):.4f}.
- ToyBench (subject / prompt fidelity against LoRA and DreamBooth): `docs/toybench.md`.

Use: `personalize zero-shot --refs a.png b.png c.png --ref-captions ... --prompt "a star in the snow"`
(this model is the default `--model`), or `InContextPipeline.from_pretrained(THIS_FOLDER, base="toy")`.
"""


def ship(run_dir: Path, recipe: str, target: Path = TARGET) -> Path:
    for name in (CONFIG_NAME, WEIGHTS_NAME, "run_summary.json", "config.yaml"):
        if not (run_dir / name).is_file():
            raise SystemExit(f"{run_dir}: no {name}; is this the output_dir of a finished `personalize train` run?")
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "run_summary.json").read_text())
    if summary.get("method") != "incontext":
        raise SystemExit(f"{run_dir}: method {summary.get('method')!r}, not an in-context model")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "run_summary.json"):
        shutil.copyfile(run_dir / name, tmp / name)
    (tmp / "README.md").write_text(card(config, summary, recipe, earlier_stages(config.get("incontext", {}))))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", type=Path, required=True, help="output_dir of a finished toy/incontext run")
    parser.add_argument("--recipe", default="toy/incontext", help="the recipe that trained it (for the card)")
    args = parser.parse_args(argv)
    target = ship(args.ship, args.recipe)
    from personalize.incontext.pipeline import InContextPipeline

    InContextPipeline.from_pretrained(str(target), base="toy")  # the shipped copy loads onto the toy model
    print(f"shipped {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
