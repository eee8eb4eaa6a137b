"""Command line: ``python -m ditkern info | demo | bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditkern", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU, and which backend runs each op (and why the others cannot)")
    demo = sub.add_parser("demo", help="patch the reference pipelines, generate digits with and without, compare")
    demo.add_argument("--out", default="ditkern_demo.png", help="where to write the side-by-side PNG")
    demo.add_argument("--quick", action="store_true", help="a tiny random model only (seconds; no reference models)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from ditkern.info import info

        info()
    elif args.cmd == "demo":
        from ditkern.demo import main as demo_main

        demo_main(out=args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
