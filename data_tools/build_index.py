"""Build a retrieval index (Re-Imagen mode of the in-context model) over an image-text collection.

    python data_tools/build_index.py photos/ outputs/photo-index --clip-weights clip.safetensors
    python data_tools/build_index.py captions.jsonl outputs/index --kind hnsw --skip-bad
    python data_tools/build_index.py outputs/toy-collection outputs/toy-index --embedder toy --query "zorbo the star"

COLLECTION is a folder tree of images with a caption file NAME.txt beside each image, or a JSONL of
{"file_name", "text"} records (file_name relative to the JSONL). INDEX_DIR receives index_text.faiss,
index_image.faiss, records.jsonl and index.json (see personalize/retrieval/). --kind auto is exact
search (flat) below 50,000 records and HNSW above. Query it with `personalize zero-shot --index INDEX_DIR`
or personalize.retrieval.query. Needs faiss: pip install faiss-cpu (or pip install -e ".[retrieval]").
--toy-collection DIR first writes a toy-world test collection there (renders of named subjects).

Everything is checked before anything is written: the options, INDEX_DIR (a folder, writable, holding no
index unless --overwrite, and no file of an index's names that this tool did not write) and, with
--toy-collection, COLLECTION (new or empty, or a toy collection this tool wrote, with --overwrite). An index
built over a collection outside INDEX_DIR is queried with the collection as its root: personalize zero-shot
--index INDEX_DIR --index-root COLLECTION (an index may only name files inside its root).
"""

import argparse
import sys
from pathlib import Path

from personalize.utils.arguments import positive_int

TOY_MANIFEST = ".toy_collection.json"  # what --toy-collection wrote into COLLECTION



def write_toy_collection(folder: Path, subjects: int, per_subject: int, overwrite: bool, progress: bool):
    """--toy-collection: into a new or empty COLLECTION, or over a toy collection this tool wrote there
    (--overwrite: its files are removed first, nothing else)."""
    from personalize.errors import OutputError
    from personalize.retrieval import toy_named_collection
    from personalize.utils.output_dir import OutputFolder

    target = OutputFolder(folder, "COLLECTION (--toy-collection)", finished=TOY_MANIFEST, overwrite=overwrite)
    target.check()
    if folder.is_dir() and not target.is_finished() and any(folder.iterdir()):
        raise OutputError(f"COLLECTION (--toy-collection): {folder} is not empty and holds no toy collection "
                          "written by this tool; choose a new folder for the toy collection")
    with target.lock():
        target.remove_previous()
        written = toy_named_collection(folder, subjects, per_subject, progress=progress)
        files = [f for s in written for image in s.files for f in (image, image.with_suffix(".txt"))]
        target.write_manifest(files, subjects=subjects, per_subject=per_subject)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collection", help="folder of images with NAME.txt captions, or a JSONL of file_name, text")
    parser.add_argument("index_dir", help="the index folder to write")
    parser.add_argument("--embedder", choices=("clip", "toy"), default="clip",
                        help="CLIP ViT-B/32 (default) or the toy world's (toy text encoder + identity judge)")
    parser.add_argument("--clip-weights", help="local open_clip ViT-B/32 checkpoint or folder (--embedder clip)")
    parser.add_argument("--toy-pooling", choices=("tokens", "mean", "pooled"), default="tokens",
                        help="--embedder toy: how captions are pooled (default tokens: mean token embedding)")
    parser.add_argument("--device", help="device of the CLIP embedder (default: cuda if available)")
    parser.add_argument("--kind", choices=("auto", "flat", "ivf", "hnsw"), default="auto",
                        help="index kind (default auto: flat below 50,000 records, else hnsw)")
    parser.add_argument("--nlist", type=positive_int, help="ivf: number of cells (default about 4 sqrt(n))")
    parser.add_argument("--nprobe", type=positive_int, help="ivf: cells searched per query (default max(16, nlist/4))")
    parser.add_argument("--hnsw-m", type=positive_int, help="hnsw: neighbours per node (default 32)")
    parser.add_argument("--ef-search", type=positive_int, help="hnsw: search breadth (default 128)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="faiss threads while building (default 1: byte-identical rebuilds)")
    parser.add_argument("--absolute-paths", action="store_true",
                        help="store absolute image paths (default: relative to the index folder)")
    parser.add_argument("--caption-extension", default=".txt", help="caption file suffix in a folder tree")
    parser.add_argument("--skip-bad", action="store_true", help="leave out bad records and unusable images")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="records per embedding call")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an index in INDEX_DIR (and a --toy-collection) this tool wrote before")
    parser.add_argument("--toy-collection", type=positive_int, nargs=2, metavar=("SUBJECTS", "PER_SUBJECT"),
                        help="first write a toy named collection of this size into COLLECTION")
    parser.add_argument("--query", help="after building, print the 5 records nearest to this text and the time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import time

    from personalize.errors import USER_ERRORS
    from personalize.retrieval import (
        OpenClipEmbedder, ToyEmbedder, build_index, check_index_folder, index_params, load_index)
    from personalize.utils.output_dir import OutputFolder

    try:
        index_params("flat", 1, nlist=args.nlist, nprobe=args.nprobe, m=args.hnsw_m, ef_search=args.ef_search)
        OutputFolder(check_index_folder(args.index_dir, args.overwrite, "index_dir"), "index_dir").check()
        if args.toy_collection:
            subjects = write_toy_collection(Path(args.collection), *args.toy_collection, overwrite=args.overwrite,
                                            progress=not args.no_progress)
            print(f"wrote {len(subjects)} toy subjects to {args.collection}, e.g. query \"{subjects[0].query}\"")
        if args.embedder == "toy":
            embedder = ToyEmbedder(pooling=args.toy_pooling)
        else:
            embedder = OpenClipEmbedder.load(args.clip_weights, device=args.device)
        result = build_index(args.collection, args.index_dir, embedder, kind=args.kind,
                             caption_extension=args.caption_extension, skip_bad=args.skip_bad,
                             relative_paths=not args.absolute_paths, batch_size=args.batch_size,
                             threads=args.threads, progress=not args.no_progress, overwrite=args.overwrite,
                             nlist=args.nlist, nprobe=args.nprobe, m=args.hnsw_m, ef_search=args.ef_search)
        print(result.summary())
        root = (Path(args.index_dir) / result.meta["root"]).resolve()
        if not root.is_relative_to(Path(args.index_dir).resolve()):
            print(f"the images are outside the index folder: query with the collection as the index root, e.g. "
                  f"personalize zero-shot --index {args.index_dir} --index-root {root}")
        if args.query:
            index = load_index(args.index_dir, root=root)  # the root this build just wrote
            start = time.perf_counter()
            hits = index.search(text=args.query, k=5, embedder=embedder)
            print(f"query {args.query!r}: {1000 * (time.perf_counter() - start):.1f} ms "
                  f"(search {1000 * index.last_query_seconds['search']:.2f} ms)")
            for record, score in hits:
                print(f"  {score:.3f}  {record['path']}  {record['text']}")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
