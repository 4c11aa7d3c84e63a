"""``jaxens generate`` for members with different tokenizers (called from :mod:`jaxens.cli`).

Used when ``--combiner`` is a cross-tokenizer method (``gac``, ``unite``, ``deepen``, ``safe``) or
``me`` with members whose vocabularies differ.  Method options come as ``--vocab-option KEY=VALUE``
(e.g. ``k=10`` for UniTE, ``mode=topk`` / ``max_anchors=4096`` for DeePEn, ``confidence=0.6`` for
SAFE); values are parsed as Python literals where possible.
"""

from __future__ import annotations

import ast
import sys
import time

CROSS_COMBINERS = ("gac", "unite", "deepen", "safe")


def wants_cross(args, loaded=None) -> bool:
    """True for a cross-tokenizer method, or ``me`` over members whose vocabularies differ."""
    if args.combiner in CROSS_COMBINERS:
        return True
    if args.combiner == "me" and loaded is not None:
        sizes = {_vocab_size(m, t) for m, t in loaded}
        return None not in sizes and len(sizes) > 1
    return False


def _vocab_size(member, tokenizer) -> int | None:
    """The tokenizer's vocabulary size (``len``, else ``vocab_size``), else the member's config."""
    for get in (lambda: len(tokenizer), lambda: tokenizer.vocab_size, lambda: member.config.vocab_size):
        try:
            return int(get())
        except (TypeError, AttributeError):
            continue
    return None


def _options(args) -> dict:
    opts = {}
    for item in getattr(args, "vocab_option", None) or []:
        if "=" not in item:
            raise ValueError(f"--vocab-option takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            opts[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k.strip()] = v
    if args.weights is not None:
        opts["weights"] = tuple(args.weights)
    return opts


def cross_generate_cli(args, out=None, err=None, loaded=None) -> int:
    from jaxens.cli import _read_prompts, load_member
    from jaxens.sampling import Sampler
    from jaxens.vocab import CrossDecoder, make_cross_method

    out = out or sys.stdout
    err = err or sys.stderr
    if args.weights is not None and len(args.weights) != len(args.member):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(args.member)} members")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    prompts = _read_prompts(args)
    if loaded is None:
        loaded = [load_member(m, args.dtype) for m in args.member]
    name = args.combiner
    try:
        method = make_cross_method(name, **_options(args))
    except TypeError as e:
        raise ValueError(f"bad --vocab-option for {name}: {e}") from None
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      greedy=args.greedy)
    dec = CrossDecoder([m for m, _ in loaded], [t for _, t in loaded], method, sampler)
    t0 = time.perf_counter()
    if len(prompts) == 1:
        printed = [""]

        def cb(step, texts):
            t = texts[0]
            if t.startswith(printed[0]) and not t.endswith("\ufffd"):
                out.write(t[len(printed[0]):])
                out.flush()
                printed[0] = t

        res = dec.generate(prompts, args.max_new_tokens, seed=args.seed, callback=cb)
        out.write(res.texts[0][len(printed[0]):] + "\n")
    else:
        res = dec.generate(prompts, args.max_new_tokens, seed=args.seed)
        for i, t in enumerate(res.texts):
            out.write(f"### prompt {i}\n{t}\n")
    out.flush()
    if args.stats:
        err.write(f"[jaxens] cross-tokenizer {name}: {res.steps} steps in {time.perf_counter() - t0:.2f}s "
                  f"(incl. compile); stats {res.stats}\n")
    return 0
