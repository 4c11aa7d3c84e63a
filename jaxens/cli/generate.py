"""``jaxens generate``: text from an ensemble of members.

Example::

    jaxens generate --member smollm2-135m --member path/to/hf_dir --combiner prob_average \\
        --weights 0.3 0.7 --top-p 0.9 --max-new-tokens 64 --prompt "Once upon a time"

Members are zoo names (:mod:`jaxens.harness.zoo`), Hugging Face checkpoint directories or GGUF
files (:func:`jaxens.harness.members.load_member`).  Prompts are encoded with the first member's
tokenizer (same-vocabulary combiners); a member whose tokenizer encodes a prompt differently is
an error.  With one prompt the text is
streamed to stdout as it is generated, under the prompt echoed; with several, each prompt and
completion is printed under ``### prompt i`` / ``### completion i`` headers when its batch is done
(:mod:`jaxens.cli.output`; ``--jsonl OUT`` writes one JSON object per prompt).  ``--stats``
reports the time to the first token (compile) apart from the decode speed (:mod:`jaxens.cli.stats`).  Cross-tokenizer methods (and ``me`` over members
whose vocabularies differ) run through :mod:`jaxens.cli.vocab`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from jaxens.cli.chat import apply_chat, chat_template_member
from jaxens.cli.output import JsonlWriter, TextStream, echo, header, record
from jaxens.cli.stats import COMPILE_NOTICE, Notice, format_stats, summarize, timed_decode
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


_SAME_VOCAB = {
    "logit_average": "geometric mean: log_softmax(sum_i w_i log p_i)",
    "prob_average": "mixture: sum_i w_i p_i",
    "me": "ME: one member drawn per step (exact samples of prob_average under plain sampling)",
    "bottleneck-sum_ce": "LP: min -sum_i w_i p.log p_i over the bottleneck set (WorkingSet)",
    "bottleneck-sum_sq_ce": "QP: min sum_i w_i (p.log p_i)^2 over the bottleneck set (WorkingSet)",
    "bottleneck-least_squares": "min ||A_H^T p - m_H||^2 over the simplex (FISTA)",
    "bottleneck-kl": "min sum_i w_i KL(p || p_i) over the bottleneck set (Newton on the dual)",
    "bottleneck-max_entropy": "maximum-entropy p in the bottleneck set (Newton on the dual)",
    "bottleneck-min_underestimation": "min max_ij p_j / p_ij over the bottleneck set (interior point + crossover)",
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
    src.add_argument("--prompts-file", "--prompt-file", dest="prompt_file",
                     help="one prompt per non-empty line ('-' for stdin), decoded in batches of --batch-size")
    g.add_argument("--batch-size", type=int, help="prompts decoded together (None: all in one batch)")
    g.add_argument("--jsonl", metavar="OUT", help="write one JSON object per prompt (prompt, completion, tokens, "
                   "timings, stats) to OUT ('-': stdout, instead of the text)")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the chat template of the first member whose tokenizer has one")
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



TRUNCATING_FLAGS = (("--greedy", "greedy"), ("--top-k", "top_k"), ("--top-p", "top_p"), ("--min-p", "min_p"))


def check_me_sampling(args, across: bool) -> None:
    """One rule for ``--combiner me`` (one vocabulary or across tokenizers): ME draws one member per
    step, so it samples the members' probability average exactly only without truncation
    (``--temperature`` applies to every member and is fine).  ``--greedy`` / ``--top-k`` /
    ``--top-p`` / ``--min-p`` would truncate the drawn member's distribution, not the mixture's:
    they are refused unless ``--me-per-member`` asks for exactly that (the published ME)."""
    if args.combiner != "me" or args.me_per_member:
        return
    given = [flag for flag, attr in TRUNCATING_FLAGS if getattr(args, attr) not in (None, False)]
    if not given:
        return
    flags = " / ".join(given)
    exact = "--combiner gac" if across else "--combiner prob_average"
    what = ("GaC: the members averaged on the union vocabulary" if across
            else "the prob_average combiner in the ordinary decode loop")
    raise ValueError(
        f"--combiner me samples the members' probability average exactly only without truncation, and {flags} "
        f"would apply to the one member drawn each step. Drop {flags} (--temperature is fine), use {exact} for "
        f"{flags} of the combined distribution ({what}), or add --me-per-member to truncate the drawn "
        "member's distribution (the published ME; not the mixture's truncation)"
    )


def _batches(n: int, size: int | None):
    """Index groups of ``size`` (the last one padded by repeating its last index: one compile)."""
    size = n if not size else size
    for s in range(0, n, size):
        idx = list(range(s, min(s + size, n)))
        yield idx, idx + [idx[-1]] * (size - len(idx))


def _same_vocab_combiner(args, members):
    sampler_kw = dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, greedy=args.greedy)
    options = {"weights": args.weights, **_bottleneck_options(args)}
    if args.combiner == "me" and not args.me_per_member:
        options.update(temperature=args.temperature, max_pending=args.me_max_pending)
        sampler = Sampler(**sampler_kw)
    else:
        if args.combiner == "me":
            options.update(max_pending=args.me_max_pending, per_member_truncation=True)
        sampler = Sampler(temperature=args.temperature, **sampler_kw)
    return make_combiner(args.combiner, members, **options), sampler


def _same_vocab(args, prompts, texts, loaded, out, err, jsonl) -> None:
    members = [m for m, _ in loaded]
    tok = loaded[0][1]
    ids = [_encode(tok, p) for p in texts]
    for i, p in enumerate(texts):
        if not ids[i]:
            raise ValueError(f"prompt {i} ({p!r}) encodes to no tokens")
        for j, (_, t) in enumerate(loaded[1:], start=1):
            if _encode(t, p) != ids[i]:
                raise ValueError(
                    f"member {j} ({args.member[j]}) tokenizes prompt {i} differently from member 0 ({args.member[0]}); "
                    f"--combiner {args.combiner} needs a shared tokenizer. For members with different tokenizers use "
                    "a cross-tokenizer method: --combiner gac (or unite, deepen, safe, me; see --list-combiners)"
                )
    combiner, sampler = _same_vocab_combiner(args, members)
    stops = list(args.stop_token)
    if not args.no_eos_stop and getattr(tok, "eos_token_id", None) is not None:
        stops.append(int(tok.eos_token_id))
    pad = getattr(tok, "pad_token_id", None)
    pad = int(pad) if pad is not None else (stops[-1] if stops else 0)
    decoder = Decoder(members, combiner, sampler, stop_tokens=stops, pad_id=pad, vocab_size=args.vocab_size)
    kind = "ME" if isinstance(combiner, MixtureEnsemble) else args.combiner
    text_out = not jsonl.to_stdout
    single = len(prompts) == 1
    for k, (idx, rows) in enumerate(_batches(len(prompts), args.batch_size)):
        stream = None
        if single and text_out:
            out.write(header("prompt", None) + prompts[0] + "\n" + header("completion", None))
            out.flush()
            stream = TextStream(tok, out)
        with Notice(err, COMPILE_NOTICE if k == 0 else None) as notice:  # the loop compiles once, before step 1
            run = timed_decode(decoder, [ids[r] for r in rows], args.max_new_tokens, seed=args.seed,
                               on_chunk=None if stream is None else (lambda chunk: stream.add(chunk[0])),
                               chunk_steps=args.chunk_steps, notice=notice)
        if stream is not None:
            stream.finish()
            out.write("\n")
        timings = {**run.timings.as_dict(), "batch": len(idx)}
        for b, i in enumerate(idx):
            completion = tok.decode(run.completions[b], skip_special_tokens=True)
            if text_out and not single:
                echo(out, prompts[i], completion, i)
            jsonl.write(record(prompts[i], completion, run.completions[b], run.finished[b],
                               args.combiner, timings, summarize(run.stats, b, len(rows))))
        out.flush()
        if args.stats:
            err.write(f"[jaxens] {kind}, batch {k} ({len(idx)} prompts): {run.timings.line()}; {run.steps} steps; "
                      f"{format_stats(run.stats)}\n")


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
        raise ValueError(f"unknown combiner {args.combiner!r}; known combiners: {', '.join(sorted(COMBINERS))}, "
                         f"and across tokenizers {', '.join(sorted(CROSS_METHODS))} (see --list-combiners)")
    if args.weights is not None and len(args.weights) != len(args.member):
        raise ValueError(f"--weights has {len(args.weights)} values for {len(args.member)} members")
    check_weights(args.weights, len(args.member), owner="--weights")  # the combiners' own check, before loading
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens} (nothing to generate)")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if cross:
        check_me_sampling(args, across=True)
    prompts = _read_prompts(args)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"--prompt {i} is empty: give some text to continue (jaxens does not generate "
                             "from the BOS token alone)")
    loaded = [jmembers.load_member(m, args.dtype) for m in args.member]
    differ = vocabularies_differ(loaded)
    check_me_sampling(args, across=cross or differ)
    if differ and not cross and args.combiner != "me":
        sizes = ", ".join(f"{name}: {jmembers.tokenizer_vocab_size(m, t)}" for name, (m, t) in zip(args.member, loaded))
        raise ValueError(f"--combiner {args.combiner} needs members that share a vocabulary, but the vocabularies "
                         f"differ ({sizes}); for members with different tokenizers use a cross-tokenizer method: "
                         "--combiner gac (or unite, deepen, safe, me; see --list-combiners)")
    texts = prompts
    if args.chat:
        j = chat_template_member([t for _, t in loaded], args.member)
        texts = [apply_chat(loaded[j][1], p) for p in prompts]
    jsonl = JsonlWriter(args.jsonl, out)
    try:
        if cross or (args.combiner == "me" and differ):
            cross_generate_cli(args, prompts, loaded, out, err, texts=texts, jsonl=jsonl)
        else:
            _same_vocab(args, prompts, texts, loaded, out, err, jsonl)
    finally:
        jsonl.close()
    return 0
