"""``python -m personalize.perf --worker SPEC``: run one benchmark worker (see :func:`run_worker`)."""

import sys

from personalize.perf.models import worker_main

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python eval/bench_train.py --help")
