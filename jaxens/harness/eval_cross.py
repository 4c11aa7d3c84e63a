r"""``jaxens eval`` for members with different vocabularies: bits per byte of held-out text.

Token-level metrics (NLL per token, top-1) do not compare across tokenizers; bits per byte do.
For held-out texts :math:`x^{(1)}, x^{(2)}, \dots` (the ``--split`` part of each ``--text``, its
first ``max_bytes`` bytes cut at a word boundary) the table has one line per

* **member** :math:`i`: :math:`\mathrm{bpb}_i = -\sum \log_2 p_i(t \mid t_{<})/|x|` over its own
  tokenization (:func:`jaxens.harness.bpb.member_bits_per_byte`);
* **cross-vocabulary method** (``gac``, ``unite``, ``deepen``, ``safe``, ``me``; default all five):
  the teacher-forced code length of the pivot's tokenization under the method's combined
  next-piece distribution, computed by the decode loop itself
  (:func:`jaxens.harness.teacher_forcing.teacher_forced_log_probs`, all methods in one pass sharing the member
  forwards), with the count of zero-probability events, :math:`+\infty` when there is one, and the
  smoothed figure :math:`P^\lambda = (1-\lambda)P + \lambda p_\pi` (default :math:`\lambda=10^{-3}`);
* **word mixture** (``word-mixture``): the word-level probability average
  (:func:`jaxens.harness.bpb.word_mixture_bits_per_byte`), a different model (see
  :mod:`jaxens.harness.bpb`), kept for reference.

Every text is cut at word boundaries into rows of about ``chunk_bytes`` bytes; each row is scored
from the members' context token (BOS, else EOS) alone, the same way for every line of the table,
so the numbers are comparable with each other (not with whole-document bpb, which conditions on
more context).  ``tok/s``: pivot positions per second of teacher forcing through the cached
decode-loop forwards (members: that member's forwards; methods: every member's forwards plus the
method's combine), compiles excluded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxens.combiners.base import normalized_weights
from jaxens.harness.bpb import (
    DEFAULT_LAMBDA,
    code_length,
    member_token_nll,
    pivot_method,
    segment_log_probs,
    split_rows,
)
from jaxens.harness.reports import EvalResult
from jaxens.harness.teacher_forcing import teacher_forced_log_probs
from jaxens.vocab import CROSS_METHODS
from jaxens.vocab.align import align, word_boundaries

CROSS_EVAL_METHODS = ("gac", "unite", "deepen", "safe", "me")
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class CrossEvalConfig:
    """Settings of a cross-vocabulary evaluation.

    Attributes:
      methods: cross methods to score (names of :data:`jaxens.vocab.CROSS_METHODS`).
      options: per-method constructor options (``{"unite": {"k": 10}}``).
      weights: member weights (every method; ``None``: uniform).
      pivot: the member whose tokenization is scored (and every method's main / drafter).
      max_bytes: bytes kept from the start of each text (cut at a word boundary; ``None``: all).
      chunk_bytes: bytes per decode-loop row.
      batch_rows: rows per teacher-forcing pass.
      lam: smoothing weight on the pivot member for the smoothed figure.
      word_mixture: also report the word-level mixture line.
      progress: tqdm progress bars on stderr.
    """

    methods: tuple[str, ...] = CROSS_EVAL_METHODS
    options: dict = dataclasses.field(default_factory=dict)
    weights: tuple | None = None
    pivot: int = 0
    max_bytes: int | None = 1500
    chunk_bytes: int = 256
    batch_rows: int = 16
    lam: float = DEFAULT_LAMBDA
    word_mixture: bool = True
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        for m in self.methods:
            if m not in CROSS_METHODS:
                raise ValueError(f"unknown cross-tokenizer method {m!r}; known: {', '.join(CROSS_EVAL_METHODS)}")
        for m in self.options:
            if m not in CROSS_METHODS:
                raise ValueError(f"options given for unknown method {m!r}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None), got {self.max_bytes}")
        for name in ("chunk_bytes", "batch_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")


def head_bytes(text: str, max_bytes: int | None) -> str:
    """The first ``max_bytes`` bytes of ``text``, cut back to the last word boundary (whole text if shorter)."""
    x = text.encode("utf-8")
    if max_bytes is None or len(x) <= max_bytes:
        return text
    ks = [k for k in word_boundaries(x).tolist() if 0 < k <= max_bytes]
    cut = ks[-1] if ks else max_bytes
    return x[:cut].decode("utf-8", "ignore")


def _method(name, cfg: CrossEvalConfig):
    try:
        return pivot_method(name, cfg.weights, cfg.pivot, cfg.options.get(name, {}))
    except TypeError as e:
        raise ValueError(f"bad options for {name}: {e}") from None


def evaluate_cross(members, tokenizers, texts: Mapping[str, str], cfg: CrossEvalConfig | None = None,
                   names: Sequence[str] | None = None, log=None):
    """Bits per byte of each member and each method of ``cfg.methods`` on ``texts`` (name -> text).

    Returns a :class:`jaxens.harness.reports.EvalResult` whose rows hold ``combiner``, ``kind``
    (``member`` / ``cross`` / ``word-mixture``), ``bpb``, ``bits``, ``bytes``, ``tokens``, ``zero``
    (zero-probability events), ``bpb_smoothed``, ``lam``, ``tok_s`` and ``per_text`` (bpb per text).
    """
    cfg = cfg or CrossEvalConfig()
    members = list(members)
    n = len(members)
    if n < 2 or n != len(tokenizers):
        raise ValueError(f"cross-vocabulary evaluation needs >= 2 members with one tokenizer each, got {n} and "
                         f"{len(tokenizers)}")
    if not 0 <= cfg.pivot < n:
        raise ValueError(f"pivot must be a member index in [0, {n}), got {cfg.pivot}")
    if cfg.weights is not None:
        normalized_weights(cfg.weights, n, np.float64, owner="jaxens eval")  # validates
    names = list(names) if names is not None else [f"member {i}" for i in range(n)]
    log = log or (lambda s: None)
    if not texts:
        raise ValueError("evaluation needs at least one text")
    t0 = time.perf_counter()
    al = align(tokenizers)
    views = list(al.views)
    log(f"alignment: union {al.union_size} entries, {al.num_anchors} anchors ({time.perf_counter() - t0:.1f}s)")
    rows, row_text = [], []
    for t, (tname, text) in enumerate(texts.items()):
        part = head_bytes(text, cfg.max_bytes)
        if not part.strip():
            raise ValueError(f"text {tname!r} is empty")
        for r in split_rows(part, cfg.chunk_bytes):
            rows.append(r)
            row_text.append(t)
    row_text = np.asarray(row_text)
    tnames = list(texts)
    row_bytes = np.asarray([len(r.encode("utf-8")) for r in rows])
    # members (and the word mixture): their own tokenizations, one row at a time
    mem_bits = np.zeros((n, len(rows)))
    mem_tokens = np.zeros(n, np.int64)
    mix_bits = np.zeros(len(rows))
    w = normalized_weights(cfg.weights, n, np.float64, owner="jaxens eval")
    bar = tqdm(rows, desc="member bpb", disable=not cfg.progress, file=sys.stderr, leave=False)
    for r, text in enumerate(bar):
        res = [member_token_nll(m, v, text) for m, v in zip(members, views)]
        x = text.encode("utf-8")
        for i, (nll, ids, v) in enumerate(res):
            if v.token_bytes(ids) != x:
                raise ValueError(f"{names[i]}'s tokenizer does not round-trip the text's bytes (unknown characters?)")
            mem_bits[i, r] = nll.sum() / LN2
            mem_tokens[i] += len(ids)
        if cfg.word_mixture:
            _, seg = segment_log_probs([q[0] for q in res], [q[1] for q in res], views, x)
            with np.errstate(divide="ignore"):
                mix = np.logaddexp.reduce(np.log(w)[:, None] + seg, axis=0)
            mix_bits[r] = -mix.sum() / LN2
    # every method in one teacher-forcing pass per batch of rows
    methods = {m: _method(m, cfg) for m in cfg.methods}
    logp = {k: [None] * len(rows) for k in ["pivot", *methods]}
    seconds = {k: 0.0 for k in methods}
    member_s = np.zeros(n)
    timed = 0
    stats: dict = {k: {} for k in methods}
    B = cfg.batch_rows
    order = np.argsort([-len(r) for r in rows], kind="stable")  # similar lengths share a batch
    batches = [order[i : i + B] for i in range(0, len(rows), B)]
    for j, idx in enumerate(batches):
        t1 = time.perf_counter()
        res = teacher_forced_log_probs(members, views, methods, [rows[i] for i in idx], pivot=cfg.pivot,
                                       alignment=al, progress=cfg.progress)
        log(f"teacher forcing batch {j + 1}/{len(batches)}: {len(idx)} rows, {sum(len(t) for t in res.ids)} pivot "
            f"tokens, {time.perf_counter() - t1:.1f}s")
        for k in logp:
            for r, i in enumerate(idx):
                logp[k][i] = res.logp[k][r]
        for k in methods:
            seconds[k] += res.seconds[k]
            for c, v in res.stats[k].items():
                stats[k][c] = stats[k].get(c, 0) + v
        member_s += np.asarray(res.member_seconds)
        timed += res.timed_positions
    pivot_tokens = int(sum(len(x) for x in logp["pivot"]))
    total_bytes = int(row_bytes.sum())

    def per_text(bits_rows):
        return {tnames[t]: float(np.sum(bits_rows[row_text == t]) / row_bytes[row_text == t].sum())
                for t in range(len(tnames))}

    out_rows = []
    for i in range(n):
        bits = float(mem_bits[i].sum())
        out_rows.append(dict(combiner=names[i] + (" (pivot)" if i == cfg.pivot else ""), kind="member",
                             bpb=bits / total_bytes, bits=bits, bytes=total_bytes, tokens=int(mem_tokens[i]), zero=0,
                             bpb_smoothed=None, lam=None, tok_s=timed / member_s[i] if member_s[i] > 0 else None,
                             per_text=per_text(mem_bits[i])))
    # the pivot as seen through the decode loop must equal its own bpb (a consistency check)
    piv_bits = float(-sum(x.sum() for x in logp["pivot"]) / LN2)
    for name, m in methods.items():
        cl = code_length(logp[name], logp["pivot"], total_bytes, cfg.lam)
        rb = np.asarray([-np.sum(x) / LN2 for x in logp[name]])
        with np.errstate(divide="ignore"):
            sm = np.asarray([-np.sum(np.logaddexp(np.log1p(-cfg.lam) + a, np.log(cfg.lam) + p)) / LN2
                             for a, p in zip(logp[name], logp["pivot"])])
        zero_text = {tnames[t]: int(sum(int(np.sum(~np.isfinite(logp[name][r]))) for r in np.nonzero(row_text == t)[0]))
                     for t in range(len(tnames))}
        cost = float(member_s.sum() + seconds[name])
        out_rows.append(dict(
            combiner=name, kind="cross", bpb=cl.bpb, bits=cl.bits, bytes=total_bytes, tokens=cl.tokens, zero=cl.zero,
            bpb_smoothed=cl.smoothed_bpb, lam=cfg.lam, tok_s=timed / cost if cost > 0 else None,
            per_text=per_text(rb), per_text_smoothed=per_text(sm), zero_per_text=zero_text,
            options={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(m).items()}
            if dataclasses.is_dataclass(m) else {k: v for k, v in vars(m).items() if not k.startswith("_")},
            **{k: v for k, v in stats[name].items()},
        ))
    if cfg.word_mixture:
        bits = float(mix_bits.sum())
        out_rows.append(dict(combiner="word-mixture", kind="word-mixture", bpb=bits / total_bytes, bits=bits,
                             bytes=total_bytes, tokens=None, zero=0, bpb_smoothed=None, lam=None, tok_s=None,
                             per_text=per_text(mix_bits)))
    meta = {
        "members": names,
        "pivot": names[cfg.pivot],
        "texts": tnames,
        "rows": len(rows),
        "bytes": total_bytes,
        "pivot_tokens": pivot_tokens,
        "union_size": al.union_size,
        "anchors": al.num_anchors,
        "pivot_check_bits": {"decode_loop": piv_bits, "member": float(mem_bits[cfg.pivot].sum())},
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_seconds": time.perf_counter() - t0,
    }
    config = dataclasses.asdict(cfg)
    return EvalResult(out_rows, config, meta)
