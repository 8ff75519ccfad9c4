"""Entry point for ``accelerate launch -m personalize.train RECIPE [section.key=value ...]``."""

import sys

from personalize.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
