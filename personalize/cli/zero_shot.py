"""``personalize zero-shot``: generate a subject from reference photos with an in-context model, no
training. The references are given (``--refs`` with optional ``--ref-captions``) or retrieved from an
image-text index (``--index``, Re-Imagen style: the K pairs nearest to the prompt or ``--query-image``;
the retrieved pairs are written next to the output so the user sees what was used).

    personalize zero-shot --refs a.png b.png c.png --prompt "a star in the snow"
    personalize zero-shot --index outputs/toy-index --index-root outputs/toy-collection \
        --query "zorbo the star" --prompt "a star in the snow"

Everything is checked before anything is written: the options, the model's config, every reference
(read and decoded; a retrieved one must be a regular image file inside the index's root: the index folder,
or the folder named with --index-root), and the output folder (--out: not a file, writable, holding none
of the inputs, and no finished run unless --overwrite). The model is loaded, the images generated, and
only then written, with a manifest (zero_shot.json) of what was written; --overwrite removes only the
files an earlier run's manifest lists, so no stale image stays beside the new ones, and a file this
command did not write is never replaced.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from personalize.incontext.shipped import DEFAULT_MODEL, default_model
from personalize.utils.arguments import parse_interval
from personalize.utils.arguments import finite_float, positive_int, seed

MANIFEST = "zero_shot.json"  # written last: the files of a finished run
RETRIEVED = "retrieved"  # the subfolder the retrieved references are copied into, with retrieved.jsonl


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="in-context model folder (incontext_config.json + incontext_weights.safetensors; "
                        f"default: the shipped toy in-context model, {DEFAULT_MODEL})")
    p.add_argument("--base", default=None, help="base model (default: the one the in-context model was trained on)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--refs", nargs="+", metavar="IMAGE", help="reference images of the subject")
    src.add_argument("--index", help="retrieve the references from this index (data_tools/build_index.py)")
    p.add_argument("--ref-captions", nargs="+", metavar="TEXT", help="one caption per reference image")
    p.add_argument("--index-root", metavar="DIR",
                   help="with --index: the folder every retrieved image must lie in (default: the index folder; "
                        "name the collection folder of an index you built over it, or trust)")
    p.add_argument("--query", help="with --index: the text to retrieve by (default: --prompt)")
    p.add_argument("--query-image", help="with --index: retrieve by similarity to this image instead")
    p.add_argument("-k", type=positive_int, default=None,
                   help="with --index: references to retrieve (default: the model's K)")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=positive_int, default=4, help="images")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    p.add_argument("--text-scale", type=finite_float, default=6.0, help="text guidance scale (ToyBench: 6)")
    p.add_argument("--ref-scale", type=finite_float, default=None,
                   help="reference guidance scale (default: the scale the model was shipped with, its config's "
                        "ref_scale: 6 for the default model, 4 for toy-incontext; 2 for a model without one)")
    p.add_argument("--ref-interval", type=parse_interval, metavar="LO,HI",
                   help="reference guidance only at noise levels LO <= t/T <= HI (elsewhere scale 1), e.g. 0,0.6")
    p.add_argument("--allow-more-references", action="store_true",
                   help="allow more references than the model was trained with")
    p.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (faster on CPUs with bf16)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", default="outputs/zero-shot", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (only the files its manifest lists are removed)")


@dataclass
class References:
    """The checked references: decoded images and captions; for retrieved ones also the bytes to copy into
    ``--out/retrieved/`` (name -> bytes), the lines of ``retrieved.jsonl`` and the source files."""

    images: list
    captions: list[str]
    copies: dict[str, bytes] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def check_options(args) -> None:
    """Options that only make sense together, refused before anything is read."""
    from personalize.errors import ConfigError

    if not args.index:
        for option, value in (("--index-root", args.index_root), ("--query", args.query),
                              ("--query-image", args.query_image), ("-k", args.k)):
            if value is not None:
                raise ConfigError(f"{option}: only with --index (the references are retrieved from an index)")
        return
    if args.ref_captions:
        raise ConfigError("--ref-captions: retrieved references come with their own captions")
    if args.query is not None and args.query_image is not None:
        raise ConfigError("--query, --query-image: give one (retrieve by text or by image)")
    if args.query is not None and not args.query.strip():
        raise ConfigError("--query: empty; give the text to retrieve by (or leave it out: --prompt)")
    if args.index_root is not None and not Path(args.index_root).expanduser().is_dir():
        raise ConfigError(f"--index-root: {args.index_root} is not a folder")




def given_references(args, spec) -> References:
    from personalize.incontext.pipeline import load_references

    images, captions = load_references(args.refs, args.ref_captions, spec, args.allow_more_references)
    return References(images, captions, sources=[str(r) for r in args.refs])


def retrieved_references(args, spec) -> References:
    """The K records nearest to the query, each read and decoded within bounds before anything is written."""
    from personalize.data.images import DataError, ImageError
    from personalize.errors import ConfigError
    from personalize.incontext.pipeline import load_references
    from personalize.retrieval import RECORDS, RetrievalError, query, read_image_file

    k = args.k if args.k is not None else spec.num_references
    if k > spec.num_references and not args.allow_more_references:
        raise ConfigError(f"-k: {k} references, but this model was trained with at most {spec.num_references}; "
                          "ask for fewer, or allow more (--allow-more-references)")
    image = None
    if args.query_image is not None:
        try:
            image = read_image_file(args.query_image).image
        except ImageError as err:
            raise DataError(f"--query-image: {err}") from None
    try:
        hits = query(args.index, text=None if image is not None else (args.query or args.prompt), image=image,
                     k=k, root=args.index_root)
    except RetrievalError as err:
        raise RetrievalError(f"--index: {err}") from None
    refs = References([], [])
    for rank, (record, score) in enumerate(hits):
        try:
            file = read_image_file(record["path"], follow_links=False)
        except ImageError as err:
            raise RetrievalError(f"--index: {Path(args.index) / RECORDS} line {record['line']}: {err}") from None
        name = f"{rank:02d}{file.suffix}"
        refs.images.append(file.image)
        refs.captions.append(record["text"])
        refs.copies[name] = file.data
        refs.sources.append(record["path"])
        refs.lines.append(json.dumps({"rank": rank, "score": float(score), "file": name, "source": record["path"],
                                      "text": record["text"]}, ensure_ascii=False))
    load_references(refs.images, refs.captions, spec, args.allow_more_references)  # the count, as for --refs
    return refs


def planned_files(refs: References, n: int) -> list[str]:
    """The files a run writes into --out, relative to it (the manifest last, not listed)."""
    names = [f"{i:03d}.png" for i in range(n)] + ["grid.png"]
    if refs.copies:
        names += [f"{RETRIEVED}/{name}" for name in refs.copies] + [f"{RETRIEVED}/retrieved.jsonl"]
    return names


def refuse_foreign_files(folder, names: list[str]) -> None:
    """A file this run would write must be absent or listed by the finished run it replaces (--overwrite)."""
    from personalize.errors import OutputError

    retrieved = folder.path / RETRIEVED
    if any(n.startswith(f"{RETRIEVED}/") for n in names) and os.path.lexists(retrieved) and (
            retrieved.is_symlink() or not retrieved.is_dir()):
        raise OutputError(f"--out: {retrieved} exists and is not a folder; move it, or choose another --out")
    folder.refuse_foreign(names, "zero-shot")


def write_outputs(out: Path, images: list, refs: References) -> list[Path]:
    """The images, the grid and the retrieved references, each atomically; on an error the files written
    so far are removed again (they are this run's)."""
    from personalize.errors import OutputError
    from personalize.sampling import image_grid
    from personalize.utils.files import atomic_write_bytes, atomic_write_text, save_image

    written: list[Path] = []
    try:
        for i, image in enumerate(images):
            written.append(save_image(image, out / f"{i:03d}.png"))
        written.append(save_image(image_grid(images, rows=1), out / "grid.png"))
        if refs.copies:
            try:
                (out / RETRIEVED).mkdir(exist_ok=True)
            except OSError as err:
                raise OutputError(f"--out: cannot create {out / RETRIEVED}: {err.strerror or err}") from None
            for name, data in refs.copies.items():
                written.append(atomic_write_bytes(out / RETRIEVED / name, data))
            written.append(atomic_write_text(out / RETRIEVED / "retrieved.jsonl", "\n".join(refs.lines) + "\n"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def run(args) -> int:
    from personalize.incontext.model import read_spec
    from personalize.incontext.pipeline import InContextPipeline
    from personalize.utils.device import resolve_device
    from personalize.utils.output_dir import OutputFolder

    check_options(args)
    model = Path(args.model) if args.model else default_model()
    spec = read_spec(model)
    refs = retrieved_references(args, spec) if args.index else given_references(args, spec)
    if refs.lines:
        print(f"retrieved {len(refs.lines)} references:")
        for line in refs.lines:
            print("  " + line)
    inputs = {"--model": [model], "--refs": args.refs or [], "--index": [args.index] if args.index else [],
              "--index-root": [args.index_root] if args.index_root else [],
              "--query-image": [args.query_image] if args.query_image else [],
              "--index (a retrieved reference)": refs.sources if args.index else []}
    folder = OutputFolder(args.out, "--out", finished=MANIFEST, overwrite=args.overwrite, inputs=inputs)
    names = planned_files(refs, args.n)
    folder.check()
    refuse_foreign_files(folder, names)
    device = resolve_device(args.device)
    pipe = InContextPipeline.from_pretrained(model, base=args.base or spec.base or "toy", device=device)
    with folder.claim():
        refuse_foreign_files(folder, names)  # again, under the lock
        images = pipe(args.prompt, refs.images, refs.captions, num_images=args.n, text_scale=args.text_scale,
                      ref_scale=args.ref_scale, steps=args.steps, seed=args.seed,
                      allow_more_references=args.allow_more_references, bf16=args.bf16,
                      ref_interval=args.ref_interval)
        removed = folder.remove_previous()
        if not refs.copies and removed and (folder.path / RETRIEVED).is_dir():
            try:
                (folder.path / RETRIEVED).rmdir()  # emptied of an earlier run's references (kept if not empty)
            except OSError:
                pass
        written = write_outputs(folder.path, images, refs)
        folder.write_manifest(written, command="zero-shot", model=str(model), prompt=args.prompt, seed=args.seed,
                              steps=args.steps, references=refs.sources,
                              captions=refs.captions)
    retrieved = f", the references in {folder.path / RETRIEVED}" if refs.copies else ""
    print(f"wrote {len(images)} images and grid.png to {folder.path}{retrieved} ({MANIFEST} lists them)")
    return 0
