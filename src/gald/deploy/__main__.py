"""``python -m gald.deploy``: print the capability table, or write / check it in a markdown file.

Usage::

    python -m gald.deploy                          # print the table
    python -m gald.deploy --write docs/deploy.md   # regenerate the table between the markers
    python -m gald.deploy --check docs/deploy.md   # exit 1 if the file's table is stale
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ._table import capability_table, update_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gald.deploy", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="MARKDOWN", help="regenerate the table in this file")
    group.add_argument("--check", metavar="MARKDOWN", help="exit 1 if this file's table is stale")
    args = parser.parse_args(argv)
    if args.write:
        changed = update_markdown(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "copy.md"
            shutil.copyfile(args.check, copy)
            stale = update_markdown(copy)
        if stale:
            print(
                f"{args.check}: the capability table is stale; run python -m gald.deploy "
                f"--write {args.check}",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check}: the capability table is up to date")
        return 0
    print(capability_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
