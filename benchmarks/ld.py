"""``python benchmarks/ld.py [options]`` is ``python -m gald.bench --ld [options]``.

With ``--device cuda`` this checks and times the Triton kernels of the fused LD op as well.
"""

import sys

from gald.bench.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main(["--ld", *sys.argv[1:]]))
