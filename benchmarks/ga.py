"""Cost of every GA layer with and without LD: ``python benchmarks/ga.py [--shape] [--json]``.

The same table as ``python -m gald.bench --ga`` without the block table in front.
"""

from __future__ import annotations

import argparse
import json

from gald.bench import ga
from gald.bench.__main__ import _shape
from gald.bench._timing import machine_info

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=_shape, default=(2, 512, 97, 97))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="GA names (default: all)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    res = ga.run(args.shape, args.repeats, names=args.only)
    print(ga.render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "ga": res}, f, indent=2)
