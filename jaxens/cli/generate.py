"""``jaxens generate``: text from an ensemble of members.

Example::

    jaxens generate --member smollm2-135m --member path/to/hf_dir --combiner prob_average \\
        --weights 0.3 0.7 --top-p 0.9 --max-new-tokens 64 --prompt "Once upon a time"

Members are zoo names (:mod:`jaxens.harness.zoo`), Hugging Face checkpoint directories or GGUF
files (:func:`jaxens.harness.members.load_member`).  Prompts are encoded with the first member's
tokenizer (same-vocabulary combiners); a member whose tokenizer encodes a prompt differently is
an error.  With one prompt the text is
streamed to stdout as it is generated; with several, each completion is printed under a
``### prompt i`` header when the batch is done.  Cross-tokenizer methods (and ``me`` over members
whose vocabularies differ) run through :mod:`jaxens.cli.vocab`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxens.cli.vocab import cross_generate_cli, wants_cross
from jaxens.vocab import CROSS_METHODS
from jaxens.decode import COMBINERS, Decoder, make_combiner
from jaxens.harness import members as jmembers
from jaxens.solvers.defaults import default_solver
from jaxens.harness.members import vocabularies_differ
from jaxens.combiners.base import check_weights
from jaxens.combiners.mixture import MixtureEnsemble
from jaxens.sampling import Sampler

NEWTON_COMBINERS = ("bottleneck-kl", "bottleneck-max_entropy")  # --hessian-topk applies (EntropicNewton)


def _encode(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer.encode(text))
    if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [int(tokenizer.bos_token_id)]
    return ids


class _TextStream:
    """Incremental detokenisation: print the new suffix of ``decode(all tokens)``."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, ids):
        self.ids += list(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self):
        """Print what is left (also when a decode rewrote already printed text)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        common = len(os.path.commonprefix([text, self.printed]))
        self.out.write(text[common:])
        self.printed = text


_SAME_VOCAB = {
    "logit_average": "geometric mean: log_softmax(sum_i w_i log p_i)",
    "prob_average": "mixture: sum_i w_i p_i",
    "me": "ME: one member drawn per step (exact samples of prob_average under plain sampling)",
    "bottleneck-sum_ce": "LP: min -sum_i w_i p.log p_i over the bottleneck set (ADMM)",
    "bottleneck-sum_sq_ce": "QP: min sum_i w_i (p.log p_i)^2 over the bottleneck set (ADMM)",
    "bottleneck-least_squares": "min ||A_H^T p - m_H||^2 over the simplex (FISTA)",
    "bottleneck-kl": "min sum_i w_i KL(p || p_i) over the bottleneck set (Newton on the dual)",
    "bottleneck-max_entropy": "maximum-entropy p in the bottleneck set (Newton on the dual)",
    "bottleneck-min_underestimation": "min max_ij p_j / p_ij over the bottleneck set (ADMM)",
    "bottleneck-cross_entropy": "min sum_i w_i H(p_i, p) over the bottleneck set (primal-dual Newton)",
}
_CROSS = {
    "gac": "union vocabulary: each member's distribution mapped onto the union, then averaged",
    "unite": "UniTE: union of the members' top-k tokens",
    "deepen": "DeePEn: averaging in a relative-representation space, mapped back",
    "safe": "SAFE: a drafter proposes, the others verify at token boundaries",
    "me": "ME across tokenizers: one member drawn per step, the others re-encode the text",
}


def list_combiners() -> str:
    """Every combiner, one line each: same-vocabulary ones, then the cross-tokenizer methods."""
    lines = ["same vocabulary (--combiner NAME):"]
    for name in sorted(COMBINERS):
        lines.append(f"  {name:32s} {_SAME_VOCAB.get(name, '(registered with jaxens.register_combiner)')}")
    lines.append("across tokenizers (members with different vocabularies):")
    for name in sorted(CROSS_METHODS):
        doc = _CROSS.get(name) or ((CROSS_METHODS[name].__doc__ or "").strip().splitlines() or [""])[0]
        lines.append(f"  {name:32s} {doc}")
    return "\n".join(lines) + "\n"


def add_generate_parser(sub) -> None:
    """Register ``jaxens generate`` on the CLI's subparsers."""
    g = sub.add_parser("generate", help="generate text with an ensemble of members",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--member", action="append", help="zoo name, HF directory or .gguf (repeat; required)")
    g.add_argument("--combiner", default="logit_average", help="combiner name (see --list-combiners)")
    g.add_argument("--weights", type=float, nargs="+", help="one weight per member")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (>= 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, help="keep the K likeliest tokens")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass")
    g.add_argument("--min-p", type=float, help="drop tokens below P x the top probability")
    g.add_argument("--greedy", action="store_true", help="take the likeliest token each step")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text, not empty (repeat for a batch)")
    src.add_argument("--prompt-file", help="one prompt per non-empty line ('-' for stdin)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampler")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="members' weight dtype")
    g.add_argument("--stop-token", type=int, action="append", default=[], help="extra stop token id (repeat)")
    g.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's EOS")
    g.add_argument("--vocab-size", type=int, help="common vocabulary size for members with padded tables")
    g.add_argument("--me-max-pending", type=int, default=8, help="ME: bound on a member's pending tokens")
    g.add_argument(
        "--me-per-member",
        action="store_true",
        help="ME: apply greedy/top-k/top-p/min-p/temperature to the drawn member (published ME; not exact)",
    )
    b = g.add_argument_group("bottleneck combiners (bottleneck-<objective>)")
    b.add_argument("--hard", nargs="+", metavar="I",
                   help="members whose moments are hard constraints: 'all' (default), 'none' or indices")
    b.add_argument("--soft", type=int, nargs="+", metavar="I", help="members entering as soft penalties")
    b.add_argument("--rho", type=float, nargs="+", help="soft-constraint strength (one value or one per member)")
    b.add_argument("--lam", type=float, default=0.0, help="smoothing weight towards the logit average, in [0, 1]")
    b.add_argument("--hessian-topk", type=int, metavar="K",
                   help="bottleneck-kl / bottleneck-max_entropy: form the Newton Hessian from the K likeliest "
                        "tokens (None: all tokens)")
    g.add_argument("--vocab-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of a cross-tokenizer method (gac, unite, deepen, safe; me across tokenizers)")
    g.add_argument("--chunk-steps", type=int, default=4, help="steps between streamed outputs")
    g.add_argument("--stats", action="store_true", help="print timing and combiner diagnostics to stderr")
    g.add_argument("--list-combiners", action="store_true", help="print every combiner with one line each and exit")
    g.set_defaults(func=cmd_generate)


def _read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {args.prompt_file!r} has no non-empty line")
        return prompts
    raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")


def _parse_hard(words: list[str]):
    """``--hard`` words -> ``"all"``, ``"none"`` or a tuple of member indices (the ``hard`` option of
    :func:`jaxens.decode.bottleneck_combiner`)."""
    lower = [h.lower() for h in words]
    if lower in (["all"], ["none"]):
        return lower[0]
    try:
        return tuple(int(h) for h in words)
    except ValueError:
        raise ValueError(f"--hard takes 'all', 'none' or member indices, got {' '.join(words)}") from None


def _bottleneck_options(args) -> dict:
    """CLI flags -> options of :func:`jaxens.decode.bottleneck_combiner` (errors for other combiners)."""
    given = [f for f, v in (("--hard", args.hard), ("--soft", args.soft), ("--rho", args.rho),
                            ("--hessian-topk", args.hessian_topk)) if v is not None]
    if args.lam != 0.0:
        given.append("--lam")
    if not args.combiner.startswith("bottleneck-"):
        if given:
            raise ValueError(f"{', '.join(given)} only apply to the bottleneck-<objective> combiners, "
                             f"not {args.combiner!r}")
        return {}
    opts = {"lam": args.lam, "vocab_size": args.vocab_size}
    if args.hessian_topk is not None:
        if args.combiner not in NEWTON_COMBINERS:
            raise ValueError(f"--hessian-topk applies to bottleneck-kl and bottleneck-max_entropy (the Newton "
                             f"solver), not {args.combiner!r}")
        opts["solver"] = default_solver(args.combiner.removeprefix("bottleneck-"), hessian_topk=args.hessian_topk)
    if args.hard is not None:
        opts["hard"] = _parse_hard(args.hard)
    if args.soft is not None:
        opts["soft"] = tuple(args.soft)
    if args.rho is not None:
        opts["rho"] = args.rho[0] if len(args.rho) == 1 else np.asarray(args.rho, np.float32)
    return opts


def cmd_generate(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.list_combiners:
        out.write(list_combiners())
        return 0
    if not args.member:
        raise ValueError("--member is required (repeat it: --member smollm2-135m --member smollm2-tiny-64)")
    cross = wants_cross(args)
    if not cross and args.combiner not in COMBINERS:
        raise ValueError(f"unknown combiner {args.combiner!r}; known combiners: {', '.join(sorted(COMBINERS))}")
    if args.weights is not None and len(args.weights) != len(args.member):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(args.member)} members")
    check_weights(args.weights, len(args.member), owner="--weights")  # the combiners' own check, before loading
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens} (nothing to generate)")
    prompts = _read_prompts(args)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"--prompt {i} is empty: give some text to continue (jaxens does not generate "
                             "from the BOS token alone)")
    loaded = [jmembers.load_member(m, args.dtype) for m in args.member]
    if cross or (args.combiner == "me" and vocabularies_differ(loaded)):
        return cross_generate_cli(args, prompts, loaded, out, err)
    members = [m for m, _ in loaded]
    tok = loaded[0][1]
    ids = [_encode(tok, p) for p in prompts]
    for i, p in enumerate(prompts):
        if not ids[i]:
            raise ValueError(f"prompt {i} ({p!r}) encodes to no tokens")
        for j, (_, t) in enumerate(loaded[1:], start=1):
            if _encode(t, p) != ids[i]:
                raise ValueError(
                    f"member {j} ({args.member[j]}) tokenizes prompt {i} differently from member 0; "
                    "same-vocabulary combiners need a shared tokenizer"
                )
    sampler_kw = dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, greedy=args.greedy)
    options = {"weights": args.weights, **_bottleneck_options(args)}
    if args.combiner == "me" and not args.me_per_member:
        options.update(temperature=args.temperature, max_pending=args.me_max_pending)
        sampler = Sampler(**sampler_kw)
    else:
        if args.combiner == "me":
            options.update(max_pending=args.me_max_pending, per_member_truncation=True)
        sampler = Sampler(temperature=args.temperature, **sampler_kw)
    combiner = make_combiner(args.combiner, members, **options)
    stops = list(args.stop_token)
    if not args.no_eos_stop and getattr(tok, "eos_token_id", None) is not None:
        stops.append(int(tok.eos_token_id))
    pad = getattr(tok, "pad_token_id", None)
    pad = int(pad) if pad is not None else (stops[-1] if stops else 0)
    decoder = Decoder(members, combiner, sampler, stop_tokens=stops, pad_id=pad, vocab_size=args.vocab_size)
    t0 = time.perf_counter()
    if len(prompts) == 1:
        stream = _TextStream(tok, out)
        result = decoder.generate(ids, args.max_new_tokens, seed=args.seed,
                                  callback=lambda chunk: stream.add(chunk[0]), chunk_steps=args.chunk_steps)
        stream.finish()
        out.write("\n")
    else:
        result = decoder.generate(ids, args.max_new_tokens, seed=args.seed)
        for i, row in enumerate(result.tokens):
            text = tok.decode(row[: result.lengths[i]].tolist(), skip_special_tokens=True)
            out.write(f"### prompt {i}\n{text}\n")
    out.flush()
    if args.stats:
        dt = time.perf_counter() - t0
        n = int(np.sum(result.lengths))
        kind = "ME" if isinstance(combiner, MixtureEnsemble) else args.combiner
        err.write(f"[jaxens] {kind}: {n} tokens in {dt:.2f}s (incl. compile) = {n / dt:.1f} tok/s; "
                  f"steps {result.steps}; stats {result.stats}\n")
    return 0
