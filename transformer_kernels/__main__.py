"""Command line: ``python -m transformer_kernels info``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformer_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension and backends: what a bug report needs")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info

        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
