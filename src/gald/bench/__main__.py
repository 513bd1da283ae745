"""``python -m gald.bench``: what the Local Distribution costs.

Default: GALD(CGNL) with and without LD at (2, 512, 97, 97) (a 769 crop at output stride 8),
forward and forward + backward median times, and the LD overhead in percent.
``--ld`` adds the fused-LD table against the authors' formulation, ``--ga`` the GA zoo table.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._timing import machine_info


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be B,C,H,W with positive ints, got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gald.bench", description=__doc__)
    parser.add_argument("--shape", type=_shape, default=(2, 512, 97, 97), help="B,C,H,W")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--ld", action="store_true", help="fused LD vs the authors' formulation")
    parser.add_argument("--ga", action="store_true", help="cost of every GA layer, with and without LD")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from . import block

    out: dict[str, Any] = {"machine": machine_info()}
    res = block.run(args.shape, args.repeats)
    out["block"] = res
    print(block.render(res))
    if args.ld:
        from . import ld

        res = ld.run(args.shape, args.repeats)
        out["ld"] = res
        print()
        print(ld.render(res))
    if args.ga:
        from . import ga

        res = ga.run(args.shape, args.repeats)
        out["ga"] = res
        print()
        print(ga.render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
