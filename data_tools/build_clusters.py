"""Build the in-context training manifest: image-caption records grouped into clusters by source.

    python data_tools/build_clusters.py photos/ clusters.jsonl --default-caption "a photo" --min-similarity 0.7
    python data_tools/build_clusters.py scraped.jsonl clusters.jsonl --max-size 12 --skip-bad \
        --clip-weights ViT-B-32.safetensors

INPUT is a folder tree ROOT/<source>/<images> (caption in NAME.txt beside an image, else
--default-caption) or a JSONL of {"file_name", "text", "url"} records (the source page URL, normalized,
is the cluster). Clusters whose images do not look alike (mean pairwise cosine of image embeddings
below --min-similarity) are dropped. Writes MANIFEST and MANIFEST-stem.stats.json beside it (what was
kept, dropped and why); train on it with the incontext method (incontext.manifest=MANIFEST).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder tree ROOT/<source>/<image> or a JSONL of file_name, text, url records")
    parser.add_argument("manifest", help="the cluster manifest to write (JSONL)")
    parser.add_argument("--default-caption", help="caption of a folder-tree image without a NAME.txt")
    parser.add_argument("--caption-extension", default=".txt", help="caption file suffix in a folder tree")
    parser.add_argument("--min-size", type=int, default=2, help="drop clusters with fewer records (default 2)")
    parser.add_argument("--max-size", type=int, help="keep at most this many records of a cluster (first by path)")
    parser.add_argument("--min-similarity", type=float,
                        help="drop clusters whose mean pairwise image similarity is below this (default: keep all; "
                             "the stats file lists every cluster's similarity either way)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records and unusable images (counted)")
    parser.add_argument("--embedder", choices=("clip", "toy"), default="clip",
                        help="image embeddings: CLIP ViT-B/32 (default) or the toy world's identity judge")
    parser.add_argument("--clip-weights", help="local open_clip ViT-B/32 checkpoint or folder (--embedder clip)")
    parser.add_argument("--device", help="device of the CLIP embedder (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per embedding call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from personalize.data.cluster_builder import build_manifest, stats_path
    from personalize.data.images import DataError
    from personalize.metrics import ClipMetric, MetricWeightsError
    from personalize.metrics.toy import ToyJudgeMetrics

    try:
        if args.embedder == "toy":
            embedder = ToyJudgeMetrics.load()
        else:
            embedder = ClipMetric.load(args.clip_weights, device=args.device)
        result = build_manifest(args.input, args.manifest, embedder, default_caption=args.default_caption,
                                caption_extension=args.caption_extension, min_size=args.min_size,
                                max_size=args.max_size, min_similarity=args.min_similarity,
                                skip_bad=args.skip_bad, batch_size=args.batch_size, progress=not args.no_progress)
    except (DataError, MetricWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.stats.summary())
    print(f"wrote {args.manifest} and {stats_path(args.manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
