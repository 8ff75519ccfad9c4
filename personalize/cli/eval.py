"""``personalize eval``: the DreamBench table (DINO, CLIP-I, CLIP-T) for any method on any base model,
or the same table on toy-world subjects scored by the toy judges.

    personalize eval dreambooth-lora-sd15 base --data shared/dreambench --base ./stable-diffusion-v1-5 \\
        --dino-weights ./dino-vits16 --clip-weights ./vit_base_patch32_clip_224.openai
    personalize eval toy/lora toy/textual-inversion renders --toy zorbo,plimm
    accelerate launch --multi_gpu --num_processes 4 -m personalize.eval dreambooth-sd15 --data ...

Also ``python eval/dreambench.py ...`` (the same arguments). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from personalize.utils.arguments import parse_interval


def _indices(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt indices such as 0,10,20, got {text!r}")


def add_reference_arguments(p) -> None:
    """The in-context rows' ``--ref-interval`` and ``--references`` (``personalize eval``, ``eval/toybench.py``)."""
    p.add_argument("--ref-interval", type=parse_interval, metavar="LO,HI",
                   help="in-context rows: reference guidance only at noise levels LO <= t/T <= HI (elsewhere "
                        "scale 1), e.g. 0,0.6")
    p.add_argument("--references", type=int, default=0, metavar="K",
                   help="in-context rows: use K of each subject's references (default 0: as many as the model was "
                        "trained with; more is allowed)")


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rows", nargs="*", metavar="ROW",
                   help="[LABEL=]RECIPE or [LABEL=]ZERO_SHOT: a recipe (path or shipped name such as "
                        "dreambooth-lora-sd15, tiny/lora, toy/lora) trains per subject, then generates; a zero-shot "
                        "method generates directly: 'base' (the base model, class noun only), 'renders' (toy "
                        "world: real renders, the ceiling), 'incontext:FOLDER' (an in-context model)")
    src = p.add_argument_group("subjects and prompts")
    src.add_argument("--data", help="DreamBench-layout folder: SUBJECT/NN.jpg and prompts_and_classes.txt")
    src.add_argument("--toy", type=_names, metavar="NAMES",
                     help="held-out toy-world subjects instead (comma-separated, e.g. zorbo,plimm, or 'all')")
    src.add_argument("--subjects", type=_names, metavar="A,B", help="only these subjects (default: all found)")
    src.add_argument("--prompts", type=_indices, metavar="I,J", help="only these prompt indices (default: all 25)")
    gen = p.add_argument_group("generation")
    gen.add_argument("-n", "--images-per-prompt", type=int, default=4, help="images per prompt (DreamBench: 4)")
    gen.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed SEED+j")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (in-context: text)")
    gen.add_argument("--ref-guidance", type=float, default=None,
                     help="in-context rows: reference guidance scale (default: each model's own, its config's ref_scale)")
    gen.add_argument("--bf16", action="store_true", help="in-context rows: sample under bfloat16 autocast")
    add_reference_arguments(gen)
    gen.add_argument("--drift-images", type=int, default=0,
                     help="also N images of the bare class prompt per row, for language drift (0 = off)")
    gen.add_argument("--resolution", type=int,
                     help="image side (default: the recipe's data.resolution; zero-shot rows: the model's own)")
    gen.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    gen.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    run = p.add_argument_group("methods")
    run.add_argument("--base", help="base model for every row (replaces each recipe's model.base)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="recipe override for every fine-tuning row, e.g. --set train.max_steps=400 (repeatable)")
    run.add_argument("--token", default="sks", help="unique identifier in DreamBooth / LoRA prompts ('a sks dog')")
    run.add_argument("--keep-weights", action="store_true", help="keep each subject's trained weights")
    run.add_argument("--caption-references", action="store_true",
                     help="fine-tuning rows train on each reference's own caption with the subject named ('a sks "
                          "ring on the grass'), for subjects whose references have captions (the toy world)")
    met = p.add_argument_group("metrics")
    met.add_argument("--metrics", choices=("dreambench", "toy", "tiny"),
                     help="dreambench = DINO + CLIP (default with --data), toy = the toy judges (default with --toy), "
                          "tiny = random tiny DINO + CLIP (smoke runs offline; the numbers mean nothing)")
    met.add_argument("--dino-weights", help="DINO ViT-S/16: a local transformers folder or a hub id "
                                            "(default facebook/dino-vits16 from the Hugging Face cache)")
    met.add_argument("--clip-weights", help="CLIP ViT-B/32 OpenAI weights: an open_clip .safetensors/.bin file or "
                                            "its folder (default timm/vit_base_patch32_clip_224.openai from the cache)")
    met.add_argument("--judges", help="toy judges file (default: the shipped one)")
    met.add_argument("--allow-pickle", action="store_true",
                     help="trust pickled --dino-weights / --clip-weights (.bin, .pt: loading a pickle can run code); "
                          "they are then read with torch.load(weights_only=True). Default: safetensors only")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="outputs/eval", help="work folder: images, per-subject results, the report")
    out.add_argument("--title", help="report title (default DreamBench or ToyBench)")
    out.add_argument("--report-only", action="store_true", help="rewrite the report from the results in --out")


def run(args) -> int:
    """Check every argument, the output folder and the metric weights before any model trains or
    generates (each refusal names its option: a :class:`UserError`, exit code 2, nothing written); then
    run the benchmark. ``--report-only`` rewrites the report from the results in ``--out``."""
    from personalize.errors import ConfigError, OutputError
    from personalize.evaluation.harness import check_out, launch_state, run_benchmark
    from personalize.evaluation.settings import EvalSettings
    from personalize.evaluation.report import write_report
    from personalize.utils.output_dir import check_writable, refuse_inputs_inside

    if args.report_only:
        out = Path(args.out)
        if not out.is_dir():
            raise OutputError(f"--out: {out} is not a folder of results (--report-only rewrites the report from "
                              "the results an earlier `personalize eval --out FOLDER` left there)")
        check_writable(out, "--out")
        files = write_report(out)
        print("\n".join(f"wrote {path}" for path in files.values()))
        return 0
    if bool(args.data) == bool(args.toy):
        raise ConfigError("give one of --data FOLDER (DreamBench layout) or --toy NAMES")
    if not args.rows:
        raise ConfigError("name at least one ROW (a recipe such as tiny/lora, or a zero-shot method: base)")
    kind = args.metrics or ("toy" if args.toy else "dreambench")
    for option, value, kinds in (("--judges", args.judges, ("toy",)), ("--dino-weights", args.dino_weights,
                                 ("dreambench",)), ("--clip-weights", args.clip_weights, ("dreambench",))):
        if value and kind not in kinds:
            raise ConfigError(f"{option}: used only with --metrics {kinds[0]}, and these metrics are {kind}")
    state = launch_state()  # before the metrics, a method or a settings check touch a GPU
    settings = EvalSettings(out=args.out, images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                            guidance=args.guidance, ref_guidance=args.ref_guidance, bf16=args.bf16,
                            references=args.references, ref_interval=args.ref_interval,
                            drift_images=args.drift_images,
                            batch_size=args.batch_size, resolution=args.resolution,
                            token=args.token, keep_weights=args.keep_weights, device=args.device,
                            caption_references=args.caption_references,
                            title=args.title or ("ToyBench" if args.toy else "DreamBench")).check()
    out = check_out(args.out)
    refuse_inputs_inside(out, "--out", {"--data": [args.data] if args.data else []})
    from personalize.evaluation.subjects import load_dreambench
    from personalize.evaluation.toybench import find_toy_subjects, toy_subjects
    from personalize.metrics import load_metrics
    from personalize.evaluation.rows import build_row

    rows = [build_row(spec, args.base, args.set) for spec in args.rows]
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"rows need distinct labels (got {', '.join(labels)}); name them LABEL=RECIPE")
    recipe_base = next((r.base for r in rows if r.kind == "fine-tune"), None)
    for r in rows:  # a zero-shot row without --base: the first recipe's base model (or the toy model)
        if r.kind == "zero-shot" and not r.base:
            r.base = recipe_base or ("toy" if args.toy else None)
    if args.toy:
        from personalize.toyworld.world import HELDOUT_NAMES

        names = list(HELDOUT_NAMES) if args.toy == ["all"] else args.toy
        if args.subjects:
            missing = [n for n in args.subjects if n not in names]
            if missing:
                raise ConfigError(f"--subjects: {', '.join(missing)} not among the --toy subjects ({', '.join(names)})")
            names = [n for n in names if n in args.subjects]
        find_toy_subjects(names, args.prompts)  # refuses bad names and prompts; references are written later
        subjects, data = [], "toy world"
    else:
        subjects, data = load_dreambench(args.data, args.subjects, args.prompts), str(args.data)
    for r in rows:
        r.check(subjects)
    metrics = load_metrics(kind, args.dino_weights, args.clip_weights, args.judges, args.device, args.allow_pickle)
    if args.toy:
        subjects = toy_subjects(names, out / "toy-subjects", args.prompts)
    files = run_benchmark(subjects, rows, metrics, settings, state, log=lambda m: print(m, flush=True), data=data)
    print(files["markdown"].read_text())
    print("\n".join(f"wrote {path}" for path in files.values()))
    return 0
