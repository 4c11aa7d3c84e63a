"""``jaxens eval``: the teacher-forced evaluation table (:mod:`jaxens.harness.evaluate`) or, for
members with different vocabularies, the bits-per-byte table (:mod:`jaxens.harness.eval_cross`);
Markdown on stdout, ``--json`` / ``--plot`` files."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from jaxens.combiners.base import check_weights
from jaxens.cli.vocab import add_cross_eval_args, parse_vocab_options
from jaxens.harness import members as jmembers
from jaxens.harness.data import data_root, read_text, split_part, split_tokens
from jaxens.harness.eval_cross import CROSS_EVAL_METHODS, CrossEvalConfig, evaluate_cross
from jaxens.harness.evaluate import CONSTRAINT_SETS, DEFAULT_MEMBERS, DEFAULT_TEXTS, SPLITS, EvalConfig, evaluate
from jaxens.harness.members import display_name, vocabularies_differ
from jaxens.harness.plots import PLOT_INSTALL, plot_bpb, plot_eval, pyplot
from jaxens.harness.reports import bpb_table, write_json
from jaxens.objectives import OBJECTIVES


def add_eval_parser(sub) -> None:
    """Register ``jaxens eval`` on the CLI's subparsers."""
    e = sub.add_parser("eval", help="teacher-forced evaluation of combiners on held-out text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--member", action="append", help=f"zoo name, HF directory or .gguf (repeat); default: "
                   f"{' '.join(DEFAULT_MEMBERS)}")
    e.add_argument("--text", action="append", help="UTF-8 text file (repeat); its --split part is evaluated; "
                   f"default: {' '.join(DEFAULT_TEXTS)} from $JAXENS_DATA")
    e.add_argument("--split", default="test", choices=SPLITS, help="split evaluated (tuning uses validation)")
    e.add_argument("--positions", type=int, default=64, help="scored positions per text")
    e.add_argument("--val-positions", type=int, default=16, help="validation positions per text (tuning)")
    e.add_argument("--context", type=int, default=128, help="tokens of context before each scored position")
    e.add_argument("--stride", type=int, default=64, help="step between evaluation windows")
    e.add_argument("--batch-rows", type=int, default=16, help="positions combined per compiled call")
    e.add_argument("--objectives", nargs="*", default=list(OBJECTIVES),
                   help="bottleneck objectives (none: skip the bottleneck rows)")
    e.add_argument("--constraints", nargs="*", default=list(CONSTRAINT_SETS), choices=CONSTRAINT_SETS,
                   help="which members are hard / soft in the bottleneck rows")
    e.add_argument("--rho", type=float, default=1.0, help="soft-constraint strength of the 'soft' set")
    e.add_argument("--learn-steps", type=int, default=100, help="Adam steps of the learned-weights rows")
    e.add_argument("--no-learn", action="store_true", help="skip the learned-weights rows")
    e.add_argument("--learn-bottleneck", action="store_true", help="also learn kl with soft constraints (slow)")
    e.add_argument("--vocab-size", type=int, help="common vocabulary size for members with padded tables")
    e.add_argument("--hessian-topk", type=int, default=2048,
                   help="kl/max_entropy Newton Hessian over the top-K tokens by mass (0: all)")
    e.add_argument("--max-iters", type=int, default=3000,
                   help="iteration cap of the ADMM default (min_underestimation) and the least-squares phase (0: the solvers' own)")
    e.add_argument("--seed", type=int, default=0, help="seed of the position sampling")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="members' weight dtype")
    e.add_argument("--json", help="write the results as JSON")
    e.add_argument("--plot", help="write a PNG plot (needs matplotlib: pip install 'jaxens[plot]')")
    e.add_argument("--store", help="folder for the finished rows (rows.jsonl, table.md), written as each row "
                   "finishes; a rerun with the same settings resumes from them")
    e.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_cross_eval_args(e)
    e.set_defaults(func=cmd_eval)


def _report(args, result, table: str, summary: str, plot, out) -> int:
    """Write the table and its summary line on ``out``, ``--json`` and ``--plot`` files."""
    out.write(table + "\n")
    out.write("\n" + summary + "\n")
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0


def cmd_eval(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.plot:  # before anything is loaded or evaluated
        try:
            pyplot()
        except ImportError:
            raise ValueError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL} (or drop --plot)") from None
    cfg = EvalConfig(
        context=args.context, stride=args.stride, positions=args.positions, val_positions=args.val_positions,
        batch_rows=args.batch_rows, seed=args.seed, objectives=tuple(args.objectives or ()),
        constraints=tuple(args.constraints or ()), rho=args.rho, learn=not args.no_learn,
        learn_steps=args.learn_steps, learn_bottleneck=args.learn_bottleneck, vocab_size=args.vocab_size,
        hessian_topk=args.hessian_topk or None, max_iters=args.max_iters or None,
        progress=not args.no_progress,
    )
    specs = list(args.member or DEFAULT_MEMBERS)
    texts = list(args.text or [str(data_root() / t) for t in DEFAULT_TEXTS])
    for t in texts:  # bad texts fail before any checkpoint loads
        read_text(t)
    if getattr(args, "weights", None) is not None:  # bad weights too
        check_weights(args.weights, len(specs), owner="--weights")
    if args.split == "validation":
        warnings.warn("evaluating on the validation split, which is also used for tuning", stacklevel=1)
    loaded = []
    for s in specs:
        try:
            loaded.append(jmembers.load_member(s, args.dtype))
        except ValueError as e:  # name the member once (load_member's messages may already)
            raise ValueError(str(e) if str(e).startswith(f"member {s!r}") else f"member {s!r}: {e}") from None
    names = [display_name(s) for s in specs]
    log = lambda s: err.write(f"[jaxens eval] {s}\n")  # noqa: E731
    if getattr(args, "cross_methods", None) or vocabularies_differ(loaded):
        return _cross_eval(args, loaded, names, texts, out, log)
    members = [m for m, _ in loaded]
    tok = loaded[0][1]
    val_tokens = split_tokens(texts, tok, "validation")
    test_tokens = split_tokens(texts, tok, args.split)
    t0 = time.perf_counter()
    result = evaluate(members, val_tokens, test_tokens, cfg, names, log=log, store=args.store)
    m = result.meta
    m["texts"] = [Path(t).name for t in texts]
    m["split"] = args.split
    m["wall_seconds"] = time.perf_counter() - t0
    vs = m.get("best_member_vs_reference") or {}
    versus = (f" (best member - reference: {vs['delta']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}])"
              if vs.get("delta") is not None and vs.get("ci_low") is not None else "")
    summary = (f"{m['test_rows']} {args.split} positions, {m['val_rows']} validation positions "
               f"({', '.join(m['texts'])}); tuned reference: {m['reference']}; best member on validation: "
               f"{m['best_member']}, on {args.split}: {m['best_member_test']}{versus}; intervals: {m['interval']}; "
               f"{m['wall_seconds']:.1f}s")
    return _report(args, result, result.markdown(), summary, plot_eval, out)


def _cross_eval(args, loaded, names, texts, out, log) -> int:
    """``jaxens eval`` with cross-vocabulary members: bits per byte."""
    methods = tuple(args.cross_methods) if args.cross_methods else CROSS_EVAL_METHODS
    if args.weights is not None and len(args.weights) != len(loaded):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(loaded)} members")
    cfg = CrossEvalConfig(
        methods=methods, options=parse_vocab_options(args.vocab_option, methods),
        weights=None if args.weights is None else tuple(args.weights), pivot=args.pivot,
        max_bytes=args.max_bytes or None, chunk_bytes=args.chunk_bytes, batch_rows=args.batch_rows,
        lam=args.smooth_lambda, word_mixture=not args.no_word_mixture, progress=not args.no_progress,
    )
    parts = {}
    for t in texts:
        part = split_part(read_text(t), args.split)
        if not part.strip():
            raise ValueError(f"the {args.split} split of {t!r} is empty")
        parts[Path(t).name] = part
    result = evaluate_cross([m for m, _ in loaded], [t for _, t in loaded], parts, cfg, names, log=log)
    result.meta["split"] = args.split
    m = result.meta
    summary = (f"bits per byte on {m['bytes']} bytes of the {args.split} split ({', '.join(m['texts'])}; "
               f"{m['rows']} rows of ~{cfg.chunk_bytes} bytes, each from the context token); methods teacher-forced on "
               f"{m['pivot']}'s tokenization ({m['pivot_tokens']} tokens); zero-prob = positions where the method gives "
               f"the observed piece probability 0 (bpb inf; smoothed with λ={cfg.lam:g} on the pivot); "
               f"{m['wall_seconds']:.1f}s")
    return _report(args, result, bpb_table(result.rows, m["texts"]), summary, plot_bpb, out)
