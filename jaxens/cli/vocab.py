"""The cross-tokenizer parts of the CLI: ``jaxens generate`` with a cross-tokenizer method and the
``jaxens eval`` options for members with different vocabularies.

Generation uses a cross-tokenizer method when ``--combiner`` is one (``gac``, ``unite``,
``deepen``, ``safe``) or is ``me`` over members whose vocabularies differ.  Method options come as
``--vocab-option KEY=VALUE`` (e.g. ``k=10`` for UniTE, ``mode=topk`` / ``max_anchors=4096`` for
DeePEn, ``confidence=0.6`` for SAFE; ``jaxens eval`` also takes ``METHOD.KEY=VALUE`` for one
method); values are parsed as Python literals where possible.
"""

from __future__ import annotations

import ast
import sys
import time

from jaxens.cli.output import JsonlWriter, echo, header, record
from jaxens.cli.stats import COMPILE_NOTICE, STALL_NOTICE, Notice, format_stats, summarize
from jaxens.harness.bpb import DEFAULT_LAMBDA
from jaxens.harness.eval_cross import CROSS_EVAL_METHODS
from jaxens.sampling import Sampler
from jaxens.vocab import CrossDecoder, make_cross_method

CROSS_COMBINERS = ("gac", "unite", "deepen", "safe")


def wants_cross(args) -> bool:
    """True when ``--combiner`` is a cross-tokenizer method (``me`` is one only when the loaded
    members' vocabularies differ: :func:`jaxens.harness.members.vocabularies_differ`)."""
    return args.combiner in CROSS_COMBINERS


def parse_vocab_options(items, methods=None) -> dict:
    """``--vocab-option`` items -> options.

    ``methods=None``: ``KEY=VALUE`` items -> ``{key: value}``.  Otherwise ``{method: {key: value}}``:
    ``METHOD.KEY=VALUE`` sets one method's option, ``KEY=VALUE`` every method's of ``methods``.
    Values are Python literals where they parse as one, else strings.
    """
    opts: dict = {}
    for item in items or []:
        if "=" not in item:
            form = "KEY=VALUE" if methods is None else "METHOD.KEY=VALUE or KEY=VALUE"
            raise ValueError(f"--vocab-option takes {form}, got {item!r}")
        k, v = item.split("=", 1)
        try:
            val = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            val = v
        k = k.strip()
        if methods is None:
            opts[k] = val
            continue
        targets = methods
        if "." in k:
            mname, k = k.split(".", 1)
            if mname not in CROSS_EVAL_METHODS:
                raise ValueError(f"--vocab-option {item!r}: unknown method {mname!r}")
            targets = [mname]
        for m in targets:
            opts.setdefault(m, {})[k] = val
    return opts


def _ids(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without the keyword
        return list(tokenizer.encode(text))


def cross_generate_cli(args, prompts, loaded, out=None, err=None, *, texts=None, jsonl=None) -> None:
    """Generate ``prompts`` with the cross-tokenizer method ``args.combiner`` over ``loaded``
    ``(member, tokenizer)`` pairs; echo, streaming, ``--jsonl`` and ``--stats`` as for
    same-vocabulary combiners (:mod:`jaxens.cli.output`).  ``texts``: what the members read
    (``prompts`` with ``--chat`` applied); ``tokens`` in a JSONL record are member 0's encoding of
    the completion."""
    out = out or sys.stdout
    err = err or sys.stderr
    texts = prompts if texts is None else texts
    jsonl = JsonlWriter(None) if jsonl is None else jsonl
    name = args.combiner
    opts = parse_vocab_options(getattr(args, "vocab_option", None))
    if args.weights is not None:
        opts["weights"] = tuple(args.weights)
    if name == "me" and getattr(args, "me_per_member", False):
        opts["per_member_truncation"] = True
    try:
        method = make_cross_method(name, **opts)
    except TypeError as e:
        raise ValueError(f"bad --vocab-option for {name}: {e}") from None
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      greedy=args.greedy)
    dec = CrossDecoder([m for m, _ in loaded], [t for _, t in loaded], method, sampler)
    tok0 = loaded[0][1]
    text_out = not jsonl.to_stdout
    single = len(prompts) == 1
    size = getattr(args, "batch_size", None) or len(prompts)
    for k, s in enumerate(range(0, len(prompts), size)):
        idx = list(range(s, min(s + size, len(prompts))))
        printed = [""]
        first: list = []
        notice = Notice(err, COMPILE_NOTICE if k == 0 else STALL_NOTICE, later=STALL_NOTICE)

        def cb(step, done_texts, printed=printed, first=first, notice=notice):
            if not first:
                first.append(time.perf_counter())
            notice.kick()
            t = done_texts[0]
            if single and text_out and t.startswith(printed[0]) and not t.endswith("\ufffd"):
                out.write(t[len(printed[0]):])
                out.flush()
                printed[0] = t

        if single and text_out:
            out.write(header("prompt", None) + prompts[0] + "\n" + header("completion", None))
            out.flush()
        t0 = time.perf_counter()
        try:
            res = dec.generate([texts[i] for i in idx], args.max_new_tokens, seed=args.seed, callback=cb)
        finally:
            notice.stop()
        t2 = time.perf_counter()
        t1 = first[0] if first else t2
        if single and text_out:
            out.write(res.texts[0][len(printed[0]):] + "\n")
        rate = (res.steps - 1) / (t2 - t1) if res.steps > 1 and t2 > t1 else None
        timings = {"compile_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
                   "steps_per_s": None if rate is None else round(rate, 2), "batch": len(idx)}
        stats = summarize(res.stats)
        for b, i in enumerate(idx):
            if text_out and not single:
                echo(out, prompts[i], res.texts[b], i)
            jsonl.write(record(prompts[i], res.texts[b], _ids(tok0, res.texts[b]), bool(res.finished[b]), name,
                               timings, stats))
        out.flush()
        if args.stats:
            speed = "n/a" if rate is None else f"{rate:.1f} steps/s (one piece per active row per step)"
            err.write(f"[jaxens] cross-tokenizer {name}, batch {k} ({len(idx)} prompts): first piece after "
                      f"{t1 - t0:.2f}s (compile + prefill); decode {res.steps - 1} steps in {t2 - t1:.2f}s = {speed}; "
                      f"{format_stats(res.stats)}\n")


def add_cross_eval_args(parser) -> None:
    """Options of ``jaxens eval`` for members with different vocabularies."""
    g = parser.add_argument_group("members with different vocabularies (bits per byte; jaxens/harness/eval_cross.py)")
    g.add_argument("--cross-methods", nargs="*", choices=CROSS_EVAL_METHODS,
                   help=f"cross-tokenizer methods to score (default: {' '.join(CROSS_EVAL_METHODS)})")
    g.add_argument("--vocab-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="option of one method, e.g. unite.k=10 or deepen.max_anchors=4096 (KEY=VALUE: every method)")
    g.add_argument("--weights", type=float, nargs="+", help="member weights of every method")
    g.add_argument("--pivot", type=int, default=0, help="member whose tokenization is scored (main/drafter)")
    g.add_argument("--max-bytes", type=int, default=1500, help="bytes kept from each text's split (0: all)")
    g.add_argument("--chunk-bytes", type=int, default=256, help="bytes per decode-loop row")
    g.add_argument("--smooth-lambda", type=float, default=DEFAULT_LAMBDA,
                   help="weight of the pivot member in the smoothed bpb")
    g.add_argument("--no-word-mixture", action="store_true", help="skip the word-level mixture line")
