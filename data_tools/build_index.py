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
"""

import argparse
import sys


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
    parser.add_argument("--nlist", type=int, help="ivf: number of cells (default about 4 sqrt(n))")
    parser.add_argument("--nprobe", type=int, help="ivf: cells searched per query (default max(16, nlist/4))")
    parser.add_argument("--hnsw-m", type=int, help="hnsw: neighbours per node (default 32)")
    parser.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="faiss threads while building (default 1: byte-identical rebuilds)")
    parser.add_argument("--absolute-paths", action="store_true",
                        help="store absolute image paths (default: relative to the index folder)")
    parser.add_argument("--caption-extension", default=".txt", help="caption file suffix in a folder tree")
    parser.add_argument("--skip-bad", action="store_true", help="leave out bad records and unusable images")
    parser.add_argument("--batch-size", type=int, default=256, help="records per embedding call")
    parser.add_argument("--toy-collection", type=int, nargs=2, metavar=("SUBJECTS", "PER_SUBJECT"),
                        help="first write a toy named collection of this size into COLLECTION")
    parser.add_argument("--query", help="after building, print the 5 records nearest to this text and the time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import time

    from personalize.errors import USER_ERRORS
    from personalize.retrieval import (
        OpenClipEmbedder, ToyEmbedder, build_index, load_index, toy_named_collection)

    try:
        if args.toy_collection:
            subjects = toy_named_collection(args.collection, *args.toy_collection, progress=not args.no_progress)
            print(f"wrote {len(subjects)} toy subjects to {args.collection}, e.g. query \"{subjects[0].query}\"")
        if args.embedder == "toy":
            embedder = ToyEmbedder(pooling=args.toy_pooling)
        else:
            embedder = OpenClipEmbedder.load(args.clip_weights, device=args.device)
        result = build_index(args.collection, args.index_dir, embedder, kind=args.kind,
                             caption_extension=args.caption_extension, skip_bad=args.skip_bad,
                             relative_paths=not args.absolute_paths, batch_size=args.batch_size,
                             threads=args.threads, progress=not args.no_progress, nlist=args.nlist,
                             nprobe=args.nprobe, m=args.hnsw_m, ef_search=args.ef_search)
        print(result.summary())
        if args.query:
            index = load_index(args.index_dir)
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
