"""The ``jaxens`` command line (argparse only; the work is done by :mod:`jaxens.harness` and the library).

Subcommands: ``generate`` (:mod:`jaxens.cli.generate`), ``train`` (:mod:`jaxens.cli.train`),
``eval`` (:mod:`jaxens.cli.eval`); the cross-tokenizer parts are :mod:`jaxens.cli.vocab`.
A ``ValueError`` or ``OSError`` raised by a subcommand exits with status 2 and one line
``jaxens <command>: error: ...`` (no traceback).

Before a subcommand runs, :func:`main` turns on jax's persistent compilation cache
(:func:`jaxens.harness.compile_cache.enable_compile_cache`; every subcommand takes
``--no-compile-cache``, and ``JAXENS_COMPILE_CACHE=0`` turns it off too) and silences the
third-party notices a user cannot act on (:func:`jaxens.cli.quiet.quiet_third_party`).
"""

from __future__ import annotations

import argparse

from jaxens.cli.eval import add_eval_parser
from jaxens.cli.generate import add_generate_parser
from jaxens.cli.quiet import quiet_third_party
from jaxens.cli.train import add_train_parser
from jaxens.harness.compile_cache import ENV as COMPILE_CACHE_ENV
from jaxens.harness.compile_cache import enable_compile_cache

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxens", description="Ensemble language models at decoding time (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--no-compile-cache", action="store_true",
                       help=f"compile without jax's persistent compilation cache (default: on, in "
                            f"${COMPILE_CACHE_ENV} or <jaxens cache>/xla; {COMPILE_CACHE_ENV}=0 also turns it off)")
    return parser


def main(argv=None) -> int:
    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not args.no_compile_cache:
            enable_compile_cache()
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"jaxens {args.command}: error: {e}\n")
    except OSError as e:  # a file or directory that cannot be read or written: one line, no traceback
        where = f" ({e.filename})" if e.filename else ""
        parser.exit(2, f"jaxens {args.command}: error: {e.strerror or e}{where}; check that the path exists and "
                       f"is writable (the jaxens cache is $JAXENS_CACHE)\n")
