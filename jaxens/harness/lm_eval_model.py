r"""jaxens ensembles as an `lm-evaluation-harness <https://github.com/EleutherAI/lm-evaluation-harness>`_
model (``pip install 'jaxens[eval]'``; lm_eval 0.4.13).

lm_eval 0.4.13 discovers models only through its own ``MODEL_MAPPING`` (no entry points), so this
module registers :class:`JaxensLM` as ``jaxens`` when imported, and ``python -m
jaxens.harness.lm_eval_model`` (console script ``jaxens-lm-eval``) registers it and runs lm_eval's CLI::

    python -m jaxens.harness.lm_eval_model --model jaxens \
        --model_args member=smollm2-135m,member=smollm2-tiny-256,combiner=prob_average \
        --tasks my_task --include_path tasks/ --batch_size 8

``member=`` may repeat (the wrapper keeps every one; lm_eval's own parser keeps only the last, so
``member0=…,member1=…`` is the spelling for :func:`lm_eval.simple_evaluate`); so may ``weight=``.
Other model args: ``combiner`` (a :data:`jaxens.decode.COMBINERS` name, or a cross-tokenizer method
``gac`` / ``unite`` / ``deepen`` / ``safe`` / ``me`` when the members' vocabularies differ),
``temperature``, ``hard`` / ``soft`` / ``rho`` / ``lam`` / ``hessian_topk`` (bottleneck),
``pivot`` (cross), ``max_length``, ``dtype``; any other key is an option of the combiner or method.

**Scores.**  A request :math:`(c, x)` is tokenized as lm_eval's own models do (the whole string
encoded, the context's ids cut off; an empty context is the BOS, else EOS, token) and

.. math::  \log p(x \mid c) = \sum_{k} \log p_\mathrm{comb}(x_k \mid c, x_{<k}),

with :math:`p_\mathrm{comb}` the combiner's distribution from the members' teacher-forced logits
(``is_greedy``: every :math:`x_k` is the argmax).  Same vocabulary: ``batch_size`` requests run
one padded forward per member (one compile per length bucket) and the combiner runs on all their
continuation rows in batches (:func:`jaxens.harness.evaluate.run_combiner`, exactly what ``jaxens
eval`` scores; ME scores its exact per-step mixture, the probability average).  Across
tokenizers the rows run through the cross-tokenizer decode loop
(:func:`jaxens.harness.teacher_forcing.teacher_forced_log_probs`) on the pivot's tokens.
``loglikelihood_rolling`` sums lm_eval's disjoint rolling windows of ``max_length`` tokens (across
tokenizers: rows of whole words up to ``max_length`` pivot tokens, each from the context token).
``generate_until`` runs the compiled decode loop (:class:`jaxens.Decoder` /
:class:`jaxens.CrossDecoder`) on batches of ``batch_size`` prompts for ``max_gen_toks`` tokens and
cuts each text at its first ``until`` string; ``do_sample=False`` or ``temperature=0`` is greedy
(ME greedy decodes its mixture, the probability average).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from jaxens.combiners.averaging import prob_average
from jaxens.combiners.mixture import MixtureEnsemble
from jaxens.decode import COMBINERS, Decoder, make_combiner
from jaxens.decode.api import member_context, member_vocab, next_pow2
from jaxens.harness.bpb import pivot_method, split_rows
from jaxens.harness.evaluate.combine import jit_combiner, run_combiner
from jaxens.harness.members import display_name, load_member, vocabularies_differ
from jaxens.harness.teacher_forcing import context_token, teacher_forced_log_probs
from jaxens.models.forward import split_jit
from jaxens.sampling import Sampler
from jaxens.solvers.defaults import default_solver
from jaxens.vocab import CROSS_METHODS, CrossDecoder
from jaxens.vocab.align import TokenizerView, align, token_offsets

REPEATED = ("member", "weight")  # model args that may repeat: member=a,member=b -> member0=a,member1=b


def numbered_args(args: dict, key: str) -> list:
    """``args[key]`` (a list, or one value), or ``args[key + "0"], args[key + "1"], ...`` (popped)."""
    if key in args:
        v = args.pop(key)
        return list(v) if isinstance(v, (list, tuple)) else [v]
    out, i = [], 0
    while f"{key}{i}" in args:
        out.append(args.pop(f"{key}{i}"))
        i += 1
    return out


def _gathered_logits_fn(model, tokens, rows, cols):
    """``logits[rows, cols]`` of a full forward of right-padded ``tokens`` (``(R, V)``)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(tokens, positions, model.init_cache(b, t), jnp.zeros((), jnp.int32), jnp.ones((b, t), bool))
    return logits[rows, cols].astype(jnp.float32)


_gathered_logits = split_jit(_gathered_logits_fn)  # weights as arguments, never copied per call


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to its first occurrence of any ``until`` string."""
    k = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:k]


class JaxensLM(TemplateLM):
    """A jaxens ensemble as an lm_eval ``LM`` (see the module docstring for the scores).

    Example::

        lm = JaxensLM(member=["smollm2-135m", "smollm2-tiny-256"], combiner="bottleneck-kl", batch_size=8)
        lm_eval.simple_evaluate(model=lm, tasks=["my_cloze"], task_manager=TaskManager(include_path="tasks"))
        # loglikelihood = sum_k log p_comb(x_k | c, x_<k)

    ``members`` / ``tokenizers`` take loaded members instead of ``member`` specs.
    """

    def __init__(self, member=None, combiner: str = "logit_average", batch_size=8, max_length=None,
                 dtype: str = "float32", temperature: float = 1.0, pivot: int = 0, max_gen_toks: int = 256,
                 seed: int = 0, progress: bool = True, members=None, tokenizers=None, device=None, **options):
        super().__init__()
        self.progress = bool(progress)
        specs = numbered_args({"member": member} if member is not None else options, "member")
        weights = numbered_args(options, "weight") or None
        if weights is None and options.get("weights") is not None:
            weights = [float(w) for w in str(options.pop("weights")).replace(":", " ").split()]
        options.pop("weights", None)
        if members is None:
            if not specs:
                raise ValueError("give the members: --model_args member=NAME,member=NAME (zoo name, HF dir or .gguf)")
            loaded = [load_member(str(s), dtype) for s in specs]
            members, tokenizers = [m for m, _ in loaded], [t for _, t in loaded]
            self.names = [display_name(str(s)) for s in specs]
        else:
            members, tokenizers = list(members), list(tokenizers)
            self.names = [f"member {i}" for i in range(len(members))]
        if len(members) != len(tokenizers) or not members:
            raise ValueError(f"got {len(members)} members and {len(tokenizers)} tokenizers")
        self.members, self.tokenizers = members, tokenizers
        self.views = [t if isinstance(t, TokenizerView) else TokenizerView(t) for t in tokenizers]
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.cross = len({v.vocab_size for v in self.views}) > 1 or (
            combiner in CROSS_METHODS and combiner not in COMBINERS) or vocabularies_differ(
            list(zip(members, tokenizers)))
        ctx = [c for c in (member_context(m) for m in members) if c]
        self.max_length = int(max_length or min(ctx + [1024]))
        self.max_gen_toks, self.seed, self.pivot = int(max_gen_toks), int(seed), int(pivot)
        self.combiner_name = combiner
        w = None if weights is None else [float(x) for x in weights]
        if self.cross:
            self.method = pivot_method(combiner, w, self.pivot, options)
            self.alignment = align(self.views)
            self.view = self.views[self.pivot]
        else:
            if combiner not in COMBINERS:
                raise ValueError(f"unknown combiner {combiner!r}; known: {', '.join(sorted(COMBINERS))}")
            self.vocab = min(member_vocab(m) for m in members)  # members that pad their tables
            opts = dict(options, weights=w)
            if combiner.startswith("bottleneck-"):
                opts.setdefault("vocab_size", self.vocab)
                if "hessian_topk" in opts:
                    opts["solver"] = default_solver(combiner.removeprefix("bottleneck-"),
                                                    hessian_topk=opts.pop("hessian_topk"))
            else:
                opts["temperature"] = float(temperature)
            self.combiner = make_combiner(combiner, members, **opts)
            # ME's per-step distribution is exactly the probability average's (its weights, temperature)
            self.scorer = (prob_average(self.combiner.weights, self.combiner.temperature)
                           if isinstance(self.combiner, MixtureEnsemble) else self.combiner)
            self._combine = jit_combiner(self.scorer)
            self.view = self.views[0]
        self._decoders: dict = {}

    # ---------------------------------------------------------------- tokenization (TemplateLM)

    @property
    def eot_token_id(self) -> int:
        return int(self.view.eos_ids[0]) if self.view.eos_ids else context_token(self.view)

    @property
    def prefix_token_id(self) -> int:
        return context_token(self.view)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.view.encode(string)

    def tok_decode(self, ids) -> str:
        return self.view.tokenizer.decode(list(ids))

    # ---------------------------------------------------------------- same vocabulary

    def _score_tokens(self, seqs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """``(sum_k log p(cont_k | ...), all argmax)`` for each ``(context ids, continuation ids)``."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]) - len(seqs[i][1]))
        out: list = [None] * len(seqs)
        B = self.batch_size
        bar = tqdm(total=len(seqs), desc=desc, file=sys.stderr, leave=False, disable=not self.progress)
        for lo in range(0, len(order), B):
            idx = order[lo : lo + B]
            rows, cols, targets, owner = [], [], [], []
            inputs = []
            for r, i in enumerate(idx):
                ctx, cont = seqs[i]
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                T = len(whole) - 1
                for k in range(len(cont)):
                    rows.append(r)
                    cols.append(T - len(cont) + k)
                    targets.append(cont[k])
                    owner.append(i)
            L = min(next_pow2(max(len(x) for x in inputs), 16), max(self.max_length, max(len(x) for x in inputs)))
            toks = np.zeros((B, L), np.int32)
            for r, x in enumerate(inputs):
                toks[r, : len(x)] = x
            R = len(rows)
            Rp = next_pow2(R, 8)  # few distinct gather sizes (one compile each)
            rr = np.asarray(rows + [0] * (Rp - R), np.int32)
            cc = np.asarray(cols + [0] * (Rp - R), np.int32)
            logits = np.stack([np.asarray(_gathered_logits(m, jnp.asarray(toks), rr, cc))[:R, : self.vocab]
                               for m in self.members])
            run = run_combiner(self.scorer, logits, max(8, B), fn=self._combine)  # one compile
            t = np.asarray(targets)
            lt = run.logp[np.arange(R), t].astype(np.float64)
            greedy = np.argmax(run.logp, axis=-1) == t
            owner = np.asarray(owner)
            for i in idx:
                sel = owner == i
                out[i] = (float(lt[sel].sum()), bool(greedy[sel].all()))
            bar.update(len(idx))
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self.cross:
            return self._cross_loglikelihood([r[0] for r in requests])
        return self._score_tokens([(c, x) for _, c, x in requests], "jaxens loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        texts = [req.args[0] for req in requests]
        if self.cross:
            return self._cross_rolling(texts)
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(w)
                owner.append(i)
        scores = self._score_tokens(windows, "jaxens loglikelihood_rolling")
        out = [0.0] * len(texts)
        for i, (s, _) in zip(owner, scores):
            out[i] += s
        return out

    # ---------------------------------------------------------------- across tokenizers

    def _cross_rows(self, rows: list[str], starts: list[int]) -> list[tuple[float, bool]]:
        """Teacher-forced ``log P`` of each row's pivot tokens from byte ``starts[r]`` on."""
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        bar = tqdm(total=len(rows), desc="jaxens cross-tokenizer teacher forcing", file=sys.stderr, leave=False,
                   disable=not self.progress)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            res = teacher_forced_log_probs(self.members, self.views, {"m": self.method}, [rows[i] for i in idx],
                                           pivot=self.pivot, alignment=self.alignment, seed=self.seed)
            for r, i in enumerate(idx):
                # every pivot token holding continuation bytes (one straddling the boundary included)
                keep = token_offsets(self.view, res.ids[r])[1:] > starts[i]
                lp = res.logp["m"][r][keep]
                out[i] = (float(lp.sum()), bool(np.all(res.greedy["m"][r][keep])))
            bar.update(len(idx))
        bar.close()
        return out

    def _cross_loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        rows, starts = [], []
        for ctx, cont in pairs:
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            ids = self.view.encode(ctx)
            if len(ids) > self.max_length:  # keep the last max_length pivot tokens of the context
                ctx = ctx.encode("utf-8")[int(token_offsets(self.view, ids)[len(ids) - self.max_length]):].decode(
                    "utf-8", "ignore")
            rows.append(ctx + cont)
            starts.append(len(ctx.encode("utf-8")))
        return self._cross_rows(rows, starts)

    def _cross_rolling(self, texts: list[str]) -> list[float]:
        rows, owner = [], []
        for i, text in enumerate(texts):
            for r in split_rows(text, 2 * self.max_length):
                rows.append(r)
                owner.append(i)
        scores = self._cross_rows(rows, [0] * len(rows))
        out = [0.0] * len(texts)
        for i, (s, _) in zip(owner, scores):
            out[i] += s
        return out

    # ---------------------------------------------------------------- generation

    def _sampler(self, kw: dict) -> Sampler:
        greedy = not kw.get("do_sample", False) or float(kw.get("temperature", 1.0) or 0.0) == 0.0
        if greedy:
            return Sampler(greedy=True)
        return Sampler(temperature=float(kw.get("temperature", 1.0)), top_p=kw.get("top_p"), top_k=kw.get("top_k"))

    def _decoder(self, sampler: Sampler):
        if sampler in self._decoders:
            return self._decoders[sampler]
        if self.cross:
            dec = CrossDecoder(self.members, self.views, self.method, sampler, alignment=self.alignment)
        else:
            comb = self.combiner
            if isinstance(comb, MixtureEnsemble) and not sampler.is_plain:
                comb = self.scorer  # ME's exact mixture, greedy / truncated in the ordinary loop
            stops = list(self.view.eos_ids)
            dec = Decoder(self.members, comb, sampler, stop_tokens=stops, pad_id=stops[0] if stops else 0,
                          vocab_size=self.vocab)
        self._decoders[sampler] = dec
        return dec

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            ctx, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", self.max_gen_toks))
            key = (self._sampler(kw), n)
            groups.setdefault(key, []).append((i, ctx, until))
        B = self.batch_size
        bar = tqdm(total=len(requests), desc="jaxens generate_until", file=sys.stderr, leave=False,
                   disable=disable_tqdm or not self.progress)
        for (sampler, n), items in groups.items():
            dec = self._decoder(sampler)
            for lo in range(0, len(items), B):
                chunk = items[lo : lo + B]
                prompts = [c for _, c, _ in chunk]
                prompts += [prompts[-1]] * (B - len(prompts))  # one batch size: one compile
                if self.cross:
                    texts = dec.generate(prompts, n, seed=self.seed).texts
                else:
                    ids = [(self.view.encode(p) or [self.prefix_token_id])[-self.max_length:] for p in prompts]
                    res = dec.generate(ids, n, seed=self.seed)
                    texts = [self.tok_decode(res.tokens[b, : res.lengths[b]]) for b in range(len(ids))]
                for (i, _, until), text in zip(chunk, texts):
                    out[i] = _cut(text, until)
                bar.update(len(chunk))
        bar.close()
        return out


def register() -> None:
    """Register :class:`JaxensLM` as lm_eval's ``jaxens`` model (once; lm_eval's own models stay listed)."""
    import lm_eval.models  # noqa: F401  (lm_eval fills its registry lazily only while it is empty)
    from lm_eval.api.registry import model_registry

    if "jaxens" not in model_registry:
        register_model("jaxens")(JaxensLM)


register()


def rewrite_model_args(argv: list[str]) -> list[str]:
    """``--model_args`` values with repeated ``member=`` / ``weight=`` keys numbered
    (``member=a,member=b`` -> ``member0=a,member1=b``), which lm_eval's parser keeps all of."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        out.append(a)
        if a in ("--model_args", "-a") and i + 1 < len(argv) and not argv[i + 1].lstrip().startswith("{"):
            counts = {k: 0 for k in REPEATED}
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                items = []
                for item in argv[j].split(","):
                    k, eq, v = item.partition("=")
                    if eq and k.strip() in counts:
                        items.append(f"{k.strip()}{counts[k.strip()]}={v}")
                        counts[k.strip()] += 1
                    else:
                        items.append(item)
                out.append(",".join(items))
                j += 1
            i = j
            continue
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's CLI with ``--model jaxens`` registered (``python -m jaxens.harness.lm_eval_model``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *rewrite_model_args(list(sys.argv[1:] if argv is None else argv))]
    cli_evaluate()


if __name__ == "__main__":
    main()
