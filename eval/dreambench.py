#!/usr/bin/env python
"""DreamBench (Ruiz et al.): DINO, CLIP-I and CLIP-T for any method of this project on any base model.

Each ROW is a recipe (trained per subject with the project's trainer, then sampled) or a zero-shot
method (``base``); each subject of a DreamBench-layout folder gets its 25 prompts x 4 images with fixed
seeds. Writes results.json, report.md and report.html (image grids) in --out; a rerun skips (row, subject)
pairs finished with the same settings and makes the others again. The same as ``personalize eval``; see docs/evaluation.md.

    python eval/dreambench.py dreambooth-lora-sd15 base --data /path/to/dreambench \\
        --base ./stable-diffusion-v1-5 --dino-weights ./dino-vits16 --clip-weights ./vit_base_patch32_clip_224.openai
    # subjects in parallel, one process per GPU:
    accelerate launch --multi_gpu --num_processes 4 eval/dreambench.py dreambooth-sd15 --data ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv in (["-h"], ["--help"]):
        print(__doc__)
    sys.exit(main(["eval", *argv]))
