"""The fused LD against the authors' formulation: ``python benchmarks/ld.py [--shape] [--json]``.

Train step (forward + backward), inference (eval; BatchNorms folded for the library) and the
bytes autograd saves for backward, at (2, 512, 97, 97) fp32 by default, with the goals of
issue 3. The same table as ``python -m gald.bench --ld`` without the block table in front.
"""

from __future__ import annotations

import argparse
import json

from gald.bench import ld
from gald.bench.__main__ import _shape
from gald.bench._timing import machine_info

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=_shape, default=(2, 512, 97, 97), help="B,C,H,W")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (interleaved)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    res = ld.run(args.shape, args.repeats)
    print(ld.render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "ld": res}, f, indent=2)
