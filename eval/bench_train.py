#!/usr/bin/env python
"""Benchmark the trainer: steps/s and peak memory per method and option on the tiny model (A), LoRA on
a random-weight SD 1.5 (and, with --device cuda, SDXL) architecture with the cache off and on (B), and
the trainer's overhead over a bare PyTorch loop (C). Prints markdown tables and writes docs/benchmarks.md.

    python eval/bench_train.py                      # the CPU run of docs/benchmarks.md (~10 min on 2 cores)
    python eval/bench_train.py --quick --only tiny  # a minute
    python eval/bench_train.py --device cuda        # SD 1.5 at 512 px and SDXL at 1024 px, 8-bit AdamW + grad ckpt
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.perf import METHODS, PARTS, VARIATIONS, BenchSettings, run_benchmark  # noqa: E402


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default: cpu)")
    p.add_argument("--only", type=_csv(PARTS), default=None, metavar="PARTS",
                   help=f"comma-separated parts to run: {', '.join(PARTS)} "
                        "(default: tiny,sd15,overhead; sdxl too with --device cuda)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and rounds; on the tiny model only LoRA gets the one-factor variations")
    p.add_argument("--methods", type=_csv(METHODS), default=list(METHODS), metavar="LIST",
                   help=f"tiny-model methods (default: {','.join(METHODS)})")
    p.add_argument("--variations", type=_csv(VARIATIONS), default=list(VARIATIONS), metavar="LIST",
                   help=f"tiny-model variations (default: {','.join(VARIATIONS)})")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels for the SD-sized models (default: 64 on cpu; 512 for sd15, 1024 for sdxl on cuda)")
    p.add_argument("--tiny-resolution", type=int, default=64, help="pixels for the tiny model (default: 64)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default: tiny 20, sd15 2 on cpu; 20/10 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per configuration")
    p.add_argument("--repeats", type=int, default=None,
                   help="passes over the configurations; each row keeps its fastest pass "
                        "(default: 2 on cpu, 1 with --quick or on cuda)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="train.mixed_precision (default: no on cpu, bf16 on cuda)")
    p.add_argument("--overhead-base", choices=["tiny-sd", "sd15"], default="tiny-sd",
                   help="model of the overhead comparison (default: tiny-sd)")
    p.add_argument("--overhead-rounds", type=int, default=None, help="interleaved rounds of the overhead comparison")
    p.add_argument("--overhead-window", type=int, default=None, help="steps per timing window of the overhead comparison")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per configuration (default: torch's own, the usable cores); "
                        "1 gives steadier numbers on a machine other jobs share")
    p.add_argument("--model-dir", default=None,
                   help="keep the random SD-sized pipelines here and reuse them on the next run (default: temporary)")
    p.add_argument("--work-dir", default=None, help="folder for temporary runs (default: a fresh temporary folder)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (faster; peak memory is then not per configuration)")
    p.add_argument("--output", default="docs/benchmarks.md", help="markdown file to write ('' to write none)")
    args = p.parse_args(argv)
    command = "python " + shlex.join(["eval/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
    settings = BenchSettings(
        device=args.device, only=args.only, quick=args.quick, methods=args.methods, variations=args.variations,
        tiny_resolution=args.tiny_resolution, resolution=args.resolution, steps=args.steps, warmup=args.warmup,
        repeats=args.repeats,
        mixed_precision=args.mixed_precision, overhead_rounds=args.overhead_rounds,
        overhead_window=args.overhead_window, overhead_base=args.overhead_base, work_dir=args.work_dir,
        model_dir=args.model_dir, threads=args.threads, isolate=not args.in_process, output=args.output or None,
        command=command)
    report = run_benchmark(settings, log=lambda m: print(m, flush=True))
    from personalize.perf import render_markdown

    print()
    print(render_markdown(report))
    if settings.output:
        print(f"wrote {settings.output}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
