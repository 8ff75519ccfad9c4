"""``personalize zero-shot``: generate a subject from reference photos with an in-context model, no
training. The references are given (``--refs`` with optional ``--ref-captions``) or retrieved from an
image-text index (``--index``, Re-Imagen style: the K pairs nearest to the prompt or ``--query-image``;
the retrieved pairs are written next to the output so the user sees what was used).

    personalize zero-shot --refs a.png b.png c.png --prompt "a star in the snow"
    personalize zero-shot --index outputs/toy-index --query "zorbo the star" --prompt "a star in the snow"
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from personalize.eval import parse_interval

# the shipped toy in-context model used when --model is not given (under personalize/toyworld/assets/): the
# own-query model, which meets ToyBench's bar against LoRA and DreamBooth at its reference scale 6
# (docs/toybench.md); the shared-query model beside it, toy-incontext, stays shipped for comparison
DEFAULT_MODEL = "toy-incontext-self"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="in-context model folder (incontext_config.json + incontext_weights.safetensors; "
                        f"default: the shipped toy in-context model, {DEFAULT_MODEL})")
    p.add_argument("--base", default=None, help="base model (default: the one the in-context model was trained on)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--refs", nargs="+", metavar="IMAGE", help="reference images of the subject")
    src.add_argument("--index", help="retrieve the references from this index (data_tools/build_index.py)")
    p.add_argument("--ref-captions", nargs="+", metavar="TEXT", help="one caption per reference image")
    p.add_argument("--query", help="with --index: the text to retrieve by (default: --prompt)")
    p.add_argument("--query-image", help="with --index: retrieve by similarity to this image instead")
    p.add_argument("-k", type=int, default=None, help="references to retrieve (default: the model's K)")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=4, help="images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--text-scale", type=float, default=6.0, help="text guidance scale (ToyBench: 6)")
    p.add_argument("--ref-scale", type=float, default=None,
                   help="reference guidance scale (default: the scale the model was shipped with, its config's "
                        "ref_scale: 6 for the default model, 4 for toy-incontext; 2 for a model without one)")
    p.add_argument("--ref-interval", type=parse_interval, metavar="LO,HI",
                   help="reference guidance only at noise levels LO <= t/T <= HI (elsewhere scale 1), e.g. 0,0.6")
    p.add_argument("--allow-more-references", action="store_true",
                   help="allow more references than the model was trained with")
    p.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (faster on CPUs with bf16)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", default="outputs/zero-shot", help="output folder")


def default_model() -> Path:
    from personalize.incontext.model import CONFIG_NAME, InContextLoadError
    from personalize.toyworld.model import ASSETS

    path = ASSETS / DEFAULT_MODEL
    if not (path / CONFIG_NAME).is_file():
        raise InContextLoadError(f"no in-context model given and the shipped toy one is not in {path}; train one "
                                 "with `personalize train toy/incontext-self` and pass --model "
                                 "outputs/toy-incontext-self")
    return path


def run(args) -> int:
    import torch

    from personalize.data.images import DataError
    from personalize.generate import save_images
    from personalize.incontext.model import read_spec
    from personalize.incontext.pipeline import InContextPipeline

    model = Path(args.model) if args.model else default_model()
    spec = read_spec(model)
    out = Path(args.out)
    if args.index:
        if args.ref_captions:
            raise DataError("--ref-captions: retrieved references come with their own captions")
        from personalize.retrieval import query

        hits = query(args.index, text=None if args.query_image else (args.query or args.prompt),
                     image=args.query_image, k=args.k or spec.num_references)
        refs, captions = [str(h[0]["path"]) for h in hits], [h[0]["text"] for h in hits]
        folder = out / "retrieved"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        lines = []
        for i, ((record, score), path) in enumerate(zip(hits, refs)):
            copy = folder / f"{i:02d}{Path(path).suffix}"
            shutil.copyfile(path, copy)
            lines.append(json.dumps({"rank": i, "score": float(score), "file": copy.name, "source": path,
                                     "text": record["text"]}))
        (folder / "retrieved.jsonl").write_text("\n".join(lines) + "\n")
        print(f"retrieved {len(refs)} references (written to {folder}):")
        for line in lines:
            print("  " + line)
    else:
        refs, captions = args.refs, args.ref_captions
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = InContextPipeline.from_pretrained(model, base=args.base or spec.base or "toy", device=device)
    images = pipe(args.prompt, refs, captions, num_images=args.n, text_scale=args.text_scale,
                  ref_scale=args.ref_scale, steps=args.steps, seed=args.seed,
                  allow_more_references=args.allow_more_references, bf16=args.bf16, ref_interval=args.ref_interval)
    save_images(images, out)
    return 0
