#!/usr/bin/env python
"""Train ToyBench's judges (attribute judge and identity embedder) on toy-world renders, measure them on
fresh renders and the held-out subjects, save them to personalize/toyworld/assets/judges.safetensors and
write docs/judges.md.

    python eval/train_judges.py                          # the shipped judges (~12 min on one CPU thread)
    python eval/train_judges.py --quick --out /tmp/judges.safetensors --doc /tmp/judges.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personalize.toyworld.judge import (  # noqa: E402
    NONE, VOCAB, Judges, add_reconstructions, blur, reconstruct, render_training_set, spec_labels,
    train_attribute_judge, train_identity_embedder,
)
from personalize.models.toy import TOY_JUDGES  # noqa: E402
from personalize.evaluation.toybench import reference_specs  # noqa: E402
from personalize.toyworld.world import COLORS, SCENES, heldout_subjects, render, sample_spec  # noqa: E402

EVAL_BLUR = 1.0  # sigma in pixels of the blurred evaluation renders: the top of the training range


def attribute_eval_specs(n_objects: int, n_per_subject: int, seed: int) -> list:
    """Fresh generic objects and the held-out subjects (a quarter recolored), from a seed training never uses."""
    rng = np.random.default_rng([7, seed])
    specs = [sample_spec(rng) for _ in range(n_objects)]
    for subject in heldout_subjects():
        for _ in range(n_per_subject):
            color = str(rng.choice([c for c in COLORS if c != subject.color])) if rng.random() < 0.25 else None
            specs.append(sample_spec(rng, subject, color=color))
    return specs


def evaluate_attributes(judges: Judges, vae, specs: list) -> dict:
    images = np.stack([render(s) for s in specs])
    variants = {"real renders": images, "VAE reconstructions": reconstruct(vae, images, bf16=False),
                f"blurred renders (sigma {EVAL_BLUR:g} px)": blur(images, EVAL_BLUR)}
    subject_rows = np.array([s.subject is not None for s in specs])
    accuracy = {}
    for name, pixels in variants.items():
        accuracy[name] = {"all": {**judges.attribute_accuracy(pixels, specs),
                                  "prompt": judges.prompt_fidelity(pixels, specs)}}
        for part, rows in (("objects", ~subject_rows), ("held-out subjects", subject_rows)):
            chosen = [s for s, keep in zip(specs, rows) if keep]
            accuracy[name][part] = {**judges.attribute_accuracy(pixels[rows], chosen),
                                    "prompt": judges.prompt_fidelity(pixels[rows], chosen)}
    predicted = judges.attributes(images)
    errors, subject_classes = Counter(), {}
    for p, s in zip(predicted, specs):
        truth = spec_labels(s)
        for head in VOCAB:
            if (p[head] or NONE) != truth[head]:
                errors[f"{head}: {truth[head]} -> {p[head] or NONE} ({s.scene or NONE})"] += 1
        if s.subject is not None:
            entry = subject_classes.setdefault(s.subject.name, {"class": s.cls, "read as": Counter()})
            entry["read as"][p["class"]] += 1
    return {"accuracy": accuracy, "errors": errors.most_common(12),
            "subject classes": {name: {**c, "read as": dict(c["read as"])} for name, c in subject_classes.items()}}


def evaluate_identity(judges: Judges, vae, queries_per_subject: int, seed: int) -> dict:
    """Re-identification among the held-out subjects: a query is a render in a scene its references do not
    show (random accessory, size, position); each gallery is the subject's 4 ToyBench reference renders."""
    rng = np.random.default_rng([8, seed])
    subjects = heldout_subjects()
    references, queries = [], []
    for subject in subjects:
        refs = reference_specs(subject)
        new_scenes = [s for s in SCENES if s not in {r.scene for r in refs}]
        references.append(np.stack([render(s) for s in refs]))
        queries.append(np.stack([render(sample_spec(rng, subject, scene=str(rng.choice(new_scenes))))
                                 for _ in range(queries_per_subject)]))
    truth = torch.arange(len(subjects)).repeat_interleave(queries_per_subject)
    real = np.concatenate(queries)
    variants = {"real renders": real, "VAE reconstructions": reconstruct(vae, real, bf16=False),
                f"blurred renders (sigma {EVAL_BLUR:g} px)": blur(real, EVAL_BLUR)}
    out = {"top-1": {}, "ceiling": {}}
    for name, pixels in variants.items():
        out["top-1"][name] = float((judges.identify(pixels, references) == truth).float().mean())
        per_subject = np.split(pixels, len(subjects))
        out["ceiling"][name] = float(np.mean([judges.subject_fidelity(q, r) for q, r in zip(per_subject, references)]))
    out["floor"] = float(np.mean([judges.subject_fidelity(queries[a], references[b])
                                  for a in range(len(subjects)) for b in range(len(subjects)) if a != b]))
    return out


def train(args, vae) -> tuple[Judges, dict]:
    """Both judges from fresh renders, and the seconds each stage took."""
    timings = {}
    start = time.perf_counter()
    data = render_training_set(args.subjects, args.renders_per_subject, args.objects, seed=args.seed)
    timings["render"] = time.perf_counter() - start
    start = time.perf_counter()
    add_reconstructions(data, vae, seed=args.seed)
    timings["recon"] = time.perf_counter() - start
    start = time.perf_counter()
    attribute = train_attribute_judge(data, args.attribute_steps, args.batch_size, width=args.width, seed=args.seed)
    timings["attribute"] = time.perf_counter() - start
    start = time.perf_counter()
    identity = train_identity_embedder(data, args.identity_steps, args.batch_size, width=args.width, seed=args.seed)
    timings["identity"] = time.perf_counter() - start
    return Judges(attribute, identity), timings


def write_doc(path: Path, args, timings: dict, attributes: dict, identity: dict, size_bytes: int, command: str):
    heads = [*VOCAB, "prompt"]
    lines = [
        "# ToyBench's judges", "",
        "Two small CNNs (`personalize/toyworld/judge.py`) that score generated toy-world images; they ship as",
        f"`personalize/toyworld/assets/judges.safetensors` ({size_bytes / 1e6:.1f} MB, config and this report in its",
        "metadata). Load them with `Judges.load()`.", "",
        "- **Attribute judge**: class, color, scene (or none) and accessory (or none) of an image. Prompt fidelity",
        "  is the fraction of generated images that show every attribute the prompt asked for (class, color, the",
        "  scene if it names one, the accessory if it names one). A subject's color label is its base color.",
        "- **Identity embedder**: a 128-d L2-normalized embedding, trained as a cosine classifier (CosFace,",
        f"  scale 16, margin 0.2) over {args.subjects} training subjects; never on the held-out subjects.",
        "  Subject fidelity is the mean cosine over all (generated, reference) pairs, like DreamBench's DINO.", "",
        "## Training", "",
        f"- Data: {args.subjects} training subjects x {args.renders_per_subject} renders (random scene, accessory,",
        f"  size, position) and {args.objects} generic objects (a quarter of them recolored training subjects), "
        f"{args.subjects * args.renders_per_subject + args.objects} renders;",
        f"  40% of them also through the toy VAE (`{args.vae}`). Each batch of {args.batch_size}: a third VAE",
        "  reconstructions, a third renders blurred with a Gaussian of random sigma in [0.4, 1.0] px, a third plain",
        "  renders; half of all mirrored (the trainer's random_flip mirrors subjects too).",
        f"- AdamW (lr 2e-3, weight decay 0.05, warm-up then cosine), batch {args.batch_size}, bf16 autocast",
        f"  (2-3x faster than fp32 on this CPU), one thread. Attribute judge: {args.attribute_steps} steps, the class",
        "  loss weighted 3x (a shared trunk otherwise learns the class last). Identity embedder:",
        f"  {args.identity_steps} steps.",
        f"- Wall time on a 2-core CPU shared with other jobs: rendering {timings['render']:.0f} s, VAE reconstructions "
        f"{timings['recon']:.0f} s,",
        f"  attribute judge {timings['attribute']:.0f} s, identity embedder {timings['identity']:.0f} s.", "",
        "## Attribute accuracy on held-out renders", "",
        f"Fresh random specs (seed {args.eval_seed}, never used in training): {args.eval_objects} generic objects and",
        f"{args.eval_per_subject} renders of each of the 12 held-out subjects (a quarter recolored). \"prompt\" is",
        "prompt fidelity: all asked attributes right.", "",
        "| images | part | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads),
    ]
    for variant, parts in attributes["accuracy"].items():
        for part, acc in parts.items():
            lines.append(f"| {variant} | {part} | " + " | ".join(f"{acc[h]:.1%}" for h in heads) + " |")
    lines += ["", "Most frequent errors on real renders (head: truth -> predicted (scene): count):", ""]
    lines += [f"- {error}: {n}" for error, n in attributes["errors"]] or ["- none"]
    misread = {name: c for name, c in attributes["subject classes"].items()
               if c["read as"].get(c["class"], 0) < 0.9 * sum(c["read as"].values())}
    if misread:
        lines += ["", "A subject's silhouette is a smooth warp of its class shape, and a strong warp can make it look",
                  "like another class; the judge then reads the class the render shows. Held-out subjects whose",
                  "class the judge reads right in less than 90% of their renders (real renders, predicted class and",
                  "count):", ""]
        lines += [f"- {name} (a {c['class']}): " + ", ".join(f"{k} {n}" for k, n in c["read as"].items())
                  for name, c in misread.items()]
    lines += [
        "", "## Identity: re-identification among the 12 held-out subjects", "",
        f"Query: a render of the subject in a scene its references do not show ({args.eval_queries} per subject,",
        "random accessory, size and position); gallery: the mean embedding of each subject's 4 ToyBench reference",
        "renders (real). Ceiling: mean cosine of a subject's queries to its own references (ToyBench's real-images",
        "row); floor: mean cosine of queries to another held-out subject's references.", "",
        "| queries | top-1 re-identification | ceiling (same subject) |", "|---|---:|---:|",
    ]
    for variant, acc in identity["top-1"].items():
        lines.append(f"| {variant} | {acc:.1%} | {identity['ceiling'][variant]:.3f} |")
    lines += ["", f"Floor (different held-out subjects, real renders): {identity['floor']:.3f}.", "",
              "## Reproduce", "", "```", command, "```", "",
              "`--evaluate-only` measures the saved judges again and rewrites this page without training.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="outputs/toy-vae/vae", help="the toy VAE (diffusers folder) for reconstructions")
    p.add_argument("--out", default=str(TOY_JUDGES), help="where to save the judges (default: the shipped asset)")
    p.add_argument("--doc", default="docs/judges.md", help="where to write the report")
    p.add_argument("--subjects", type=int, default=1500, help="training subjects of the identity embedder")
    p.add_argument("--renders-per-subject", type=int, default=8)
    p.add_argument("--objects", type=int, default=8000, help="generic (and recolored-subject) renders")
    p.add_argument("--attribute-steps", type=int, default=2000)
    p.add_argument("--identity-steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--eval-objects", type=int, default=600)
    p.add_argument("--eval-per-subject", type=int, default=50)
    p.add_argument("--eval-queries", type=int, default=20, help="re-identification queries per held-out subject")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny run to check the script (useless judges)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="measure the judges saved at --out again and rewrite the report, without training "
                        "(the report describes the training arguments given now)")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.renders_per_subject, args.objects = 20, 4, 100
        args.attribute_steps = args.identity_steps = 5
        args.eval_objects, args.eval_per_subject, args.eval_queries = 24, 2, 2
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    command = ("python eval/train_judges.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    if args.evaluate_only:
        judges = Judges.load(args.out)
        timings, command = judges.report["seconds"], judges.report.get("command", "python eval/train_judges.py")
    else:
        judges, timings = train(args, vae)

    attributes = evaluate_attributes(judges, vae, attribute_eval_specs(args.eval_objects, args.eval_per_subject,
                                                                       args.eval_seed))
    identity_report = evaluate_identity(judges, vae, args.eval_queries, args.eval_seed)
    judges.report = {"attributes": attributes, "identity": identity_report, "seconds": timings, "command": command}
    out = judges.save(args.out)
    write_doc(Path(args.doc), args, timings, attributes, identity_report, out.stat().st_size, command)
    for variant, parts in attributes["accuracy"].items():
        print(variant, {h: round(a, 3) for h, a in parts["all"].items()})
    print("identity top-1", identity_report["top-1"], "ceiling", identity_report["ceiling"],
          "floor", round(identity_report["floor"], 3))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) and {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
