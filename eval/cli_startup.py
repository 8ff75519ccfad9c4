#!/usr/bin/env python
"""Time the command line where nothing needs a model (`--help` of every subcommand, `personalize recipes`,
a recipe with a misspelled key or an impossible value): whole-process wall time and peak memory; the
section "Command-line start-up" of docs/benchmarks.md. Logic: personalize/perf/startup.py.

    python eval/cli_startup.py                 # 5 runs per command
    python eval/cli_startup.py --runs 3 --doc ''
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BEGIN, END = "<!-- cli-startup:begin -->", "<!-- cli-startup:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="counted runs per command (after one warm-up)")
    parser.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: give 1 or more")

    from personalize.perf.report import replace_section
    from personalize.perf.startup import markdown, measure

    command = " ".join(["python eval/cli_startup.py", *(argv if argv is not None else sys.argv[1:])])
    lines = markdown(measure(runs=args.runs), args.runs, command)
    print("\n".join(lines))
    if args.doc:
        replace_section(Path(args.doc), BEGIN, END, "\n".join([BEGIN, *lines, END]))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
