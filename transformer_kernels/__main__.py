"""Command line: ``python -m transformer_kernels info | train | translate | evaluate``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformer_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension and backends: what a bug report needs")
    from .train import cli

    cli.add_train(sub.add_parser("train", help="train the paper's model (no data given: a synthetic task)"))
    cli.add_translate(sub.add_parser("translate", help="translate sentences with a trained model (beam search)"))
    cli.add_evaluate(sub.add_parser("evaluate", help="BLEU (sacreBLEU) and loss of a trained model on a test set"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info

        print(info())
        return 0
    return {"train": cli.run_train, "translate": cli.run_translate, "evaluate": cli.run_evaluate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
