"""``accelerate launch -m personalize.eval ...``: the same as ``personalize eval ...`` (:mod:`personalize.cli.eval`),
one process per GPU sharing the subjects."""

import sys

from personalize.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
