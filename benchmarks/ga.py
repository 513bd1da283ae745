"""``python benchmarks/ga.py [options]`` is ``python -m gald.bench --ga all [options]``."""

import sys

from gald.bench.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main(["--ga", "all", *sys.argv[1:]]))
