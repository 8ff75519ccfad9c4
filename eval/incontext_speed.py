#!/usr/bin/env python
"""In-context vs fine-tuning speed on this machine, in one run: time from a subject's reference photos
to 4 images (in-context: encode + sample; DreamBooth and LoRA: train with their ToyBench recipe, load,
sample), and the reference attention's overhead on a sampling loop. Writes a section of
docs/benchmarks.md.

    python eval/incontext_speed.py                          # the shipped toy in-context model
    python eval/incontext_speed.py --model outputs/toy-incontext
    python eval/incontext_speed.py --model untrained        # reference layers as installed (same cost)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BEGIN, END = "<!-- incontext-speed:begin -->", "<!-- incontext-speed:end -->"


def main(argv=None) -> int:
    import torch

    from personalize.perf.incontext_speed import (
        finetune_photos_to_images, incontext_photos_to_images, reference_attention_overhead,
    )
    from personalize.utils.precision import cpu_has_native_bf16
    from personalize.evaluation.toybench import METHOD_RECIPES, reference_specs, write_references
    from personalize.toyworld.world import caption, heldout_subjects

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="in-context model folder, or 'untrained' (default: shipped)")
    parser.add_argument("--subject", default="zorbo")
    parser.add_argument("--references", type=int, default=4,
                        help="reference renders for every method (ToyBench: 4; the default in-context model's K)")
    parser.add_argument("--methods", default="dreambooth,lora")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    args = parser.parse_args(argv)

    subject = {s.name: s for s in heldout_subjects()}[args.subject]
    work = Path(tempfile.mkdtemp(prefix="incontext-speed-"))
    refs_dir = work / "references"
    specs = reference_specs(subject, args.references)
    references = write_references(subject, refs_dir, args.references)
    captions = [caption(s) for s in specs]
    prompt = f"a {subject.cls} in the snow"

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_s = time.perf_counter() - start
    pipe(prompt, references[:1], captions[:1], num_images=1, steps=2)  # warm up
    incontext_s = incontext_photos_to_images(pipe, references, captions, prompt, args.n, args.steps)
    rows = {"in-context": {"total_seconds": incontext_s, "train_seconds": 0.0, "generate_seconds": incontext_s}}
    bf16_s = None  # CPUs without bf16 instructions emulate it, many times slower (personalize/utils/precision.py): skipped
    if torch.cuda.is_available() or cpu_has_native_bf16():
        pipe(prompt, references[:1], captions[:1], num_images=1, steps=2, bf16=True)  # warm up
        bf16_s = incontext_photos_to_images(pipe, references, captions, prompt, args.n, args.steps, bf16=True)
        rows["in-context, bf16 autocast"] = {"total_seconds": bf16_s, "train_seconds": 0.0, "generate_seconds": bf16_s}
    for method in [m for m in args.methods.split(",") if m]:
        rows[method] = finetune_photos_to_images(METHOD_RECIPES[method], refs_dir, subject.cls, prompt, work / method,
                                                 args.n, args.steps)
        print(f"{method}: {rows[method]['total_seconds']:.1f} s", flush=True)
    overhead = reference_attention_overhead(pipe, references, captions, prompt, args.n, args.steps)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [BEGIN, "## In-context vs fine-tuning: reference photos to 4 images", "",
             f"Measured by `{' '.join(['python eval/incontext_speed.py', *(argv if argv is not None else sys.argv[1:])])}`"
             f" on {device} (CPU), toy model, subject {args.subject} ({args.references} reference renders), {args.n} images, "
             f"{args.steps} DDIM steps. In-context model: {args.model or 'shipped'} (loaded in {load_s:.1f} s, "
             "not counted). Fine-tuning: the ToyBench recipe's training, then loading the result into a stock "
             "diffusers pipeline and sampling (fine-tuning trains at the recipes' precision, `auto`: bf16 autocast on "
             "CPUs with bf16 instructions, else float32; sampling is float32).", "",
             "| method | train s | generate s | photos to 4 images, s | vs in-context | vs in-context, bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        vs_bf16 = f"{r['total_seconds'] / bf16_s:.1f}x" if bf16_s else "–"
        lines.append(f"| {name} | {r['train_seconds']:.1f} | {r['generate_seconds']:.1f} | {r['total_seconds']:.1f} | "
                     f"{r['total_seconds'] / incontext_s:.1f}x | {vs_bf16} |")
    if bf16_s is None:
        lines += ["", "No bf16 row: this CPU has no bf16 instructions, so bf16 autocast would be emulated and many "
                  "times slower (`python eval/cpu_precision.py`)."]
    lines += ["", f"Reference attention overhead on the sampling loop (batch {overhead['batch']}, {overhead['steps']} "
              f"U-Net calls, median of {overhead['repeats']} interleaved runs): {overhead['with_reference_s']:.2f} s "
              f"with vs {overhead['without_reference_s']:.2f} s without = **{overhead['ratio']:.2f}x**.", END]
    section = "\n".join(lines)
    print(section)
    print(json.dumps({"rows": rows, "overhead": overhead}, indent=2))
    if args.doc:
        from personalize.perf.report import replace_section

        replace_section(Path(args.doc), BEGIN, END, section)
    return 0


def load_pipeline(model):
    from personalize.config import ModelConfig
    from personalize.incontext import InContextSpec, install_reference_attention
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.incontext.shipped import default_model
    from personalize.models import load_models

    if model == "untrained":
        models = load_models(ModelConfig(base="toy", attention="classic"))
        install_reference_attention(models.unet, ["mid", "up"])
        return InContextPipeline(models, InContextSpec(family="sd", blocks=["mid", "up"], num_references=3))
    return InContextPipeline.from_pretrained(model or default_model(), base="toy", attention="classic")


if __name__ == "__main__":
    sys.exit(main())
