"""Command line: ``python -m transformer_kernels info | train | translate | evaluate | bench | compile-check``.

Each subcommand imports only what it needs: ``info`` stays light (no tokenizers, no safetensors),
and ``bench`` hands its arguments to the benchmark suite (``transformer_kernels.bench``).
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "info": "versions, GPU, extension and backends: what a bug report needs",
    "train": "train the paper's model (no data given: a synthetic task)",
    "translate": "translate sentences with a trained model (beam search)",
    "evaluate": "BLEU (sacreBLEU) and loss of a trained model on a test set",
    "bench": "the benchmark suite: ops, layers and training throughput against PyTorch (see bench -h)",
    "compile-check": "compile every kernel for sm_80 and sm_90 offline and check its resources (see -h)",
}


def run_bench(argv: list[str]) -> int:
    from .bench import suite

    return suite.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "bench":  # the suite parses its own arguments (ops, --quick, --dtype, --out)
        i = argv.index("bench")
        if any(a not in ("-h", "--help") for a in argv[:i]):
            raise SystemExit("bench: put the suite's options after `bench`")
        return run_bench(argv[i + 1 :])
    if command == "compile-check":  # parses its own arguments (--arch, --kernel, --jobs, --json, --cuda)
        from .compile_check import main as compile_check

        i = argv.index("compile-check")
        return compile_check(argv[i + 1 :])
    parser = argparse.ArgumentParser(prog="python -m transformer_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}
    if command in ("train", "translate", "evaluate"):  # the training CLI only when it is asked for
        from .train import cli

        {"train": cli.add_train, "translate": cli.add_translate, "evaluate": cli.add_evaluate}[command](
            parsers[command]
        )
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info

        print(info())
        return 0
    from .train import cli

    return {"train": cli.run_train, "translate": cli.run_translate, "evaluate": cli.run_evaluate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
