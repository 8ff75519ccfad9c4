#!/usr/bin/env python
"""Time a training step of the toy U-Net in float32 and under bfloat16 autocast on this CPU, next to its
bfloat16 instructions (from /proc/cpuinfo) and what train.mixed_precision: auto picks here; the section
"CPU autocast precision" of docs/benchmarks.md. Logic: personalize/perf/precision.py.

    python eval/cpu_precision.py                 # 1 thread, batch 8
    python eval/cpu_precision.py --threads 2 --doc ''
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BEGIN, END = "<!-- cpu-precision:begin -->", "<!-- cpu-precision:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision (after 1 warm-up step)")
    parser.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    args = parser.parse_args(argv)

    import torch

    from personalize.perf.precision import toy_unet_step_seconds
    from personalize.perf.report import replace_section
    from personalize.utils.precision import cpu_bf16_flags, resolve_mixed_precision

    torch.set_num_threads(args.threads)
    seconds = {p: toy_unet_step_seconds(p, args.batch, args.steps) for p in ("no", "bf16")}
    command = " ".join(["python eval/cpu_precision.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [BEGIN, "## CPU autocast precision", "",
             f"Measured by `{command}` on {platform.processor() or platform.machine()} "
             f"({torch.backends.cpu.get_cpu_capability()}; bf16 instructions: "
             f"{', '.join(sorted(cpu_bf16_flags())) or 'none'}), {args.threads} thread(s), torch "
             f"{torch.__version__}: one training step of the toy U-Net, batch {args.batch}, median of {args.steps}.",
             "", "| precision | s / step | vs float32 |", "|---|---:|---:|",
             f"| float32 (`no`) | {seconds['no']:.3f} | 1.00x |",
             f"| bf16 autocast | {seconds['bf16']:.3f} | {seconds['bf16'] / seconds['no']:.2f}x |", "",
             f"`train.mixed_precision: auto` picks **{resolve_mixed_precision('auto', 'cpu')}** on this CPU "
             "(bf16 only where the CPU has bfloat16 instructions; `personalize/utils/precision.py`).", END]
    section = "\n".join(lines)
    print(section)
    if args.doc:
        replace_section(Path(args.doc), BEGIN, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
