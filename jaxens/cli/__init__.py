"""The ``jaxens`` command line (argparse only; the work is done by :mod:`jaxens.harness` and the library).

Subcommands: ``generate`` (:mod:`jaxens.cli.generate`), ``train`` (:mod:`jaxens.cli.train`),
``eval`` (:mod:`jaxens.cli.eval`); the cross-tokenizer parts are :mod:`jaxens.cli.vocab`.
A ``ValueError`` or ``OSError`` raised by a subcommand exits with status 2 and one line
``jaxens <command>: error: ...`` (no traceback).
"""

from __future__ import annotations

import argparse

from jaxens.cli.eval import add_eval_parser
from jaxens.cli.generate import add_generate_parser
from jaxens.cli.train import add_train_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxens", description="Ensemble language models at decoding time (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"jaxens {args.command}: error: {e}\n")
    except OSError as e:  # a file or directory that cannot be read or written: one line, no traceback
        where = f" ({e.filename})" if e.filename else ""
        parser.exit(2, f"jaxens {args.command}: error: {e.strerror or e}{where}; check that the path exists and "
                       f"is writable (the jaxens cache is $JAXENS_CACHE)\n")
