r"""Bits per byte of held-out text: a tokenizer-independent score for members and cross-vocab ensembles.

**A member.**  The text's bytes :math:`x` are encoded by the member's tokenizer as
:math:`t_1..t_n` after one context token :math:`t_0` (its BOS, else its EOS/document separator);
:math:`\mathrm{bpb} = \sum_{k=1}^{n} -\log_2 p(t_k \mid t_{<k}) / |x|`.  (Other tokenizations of the
same bytes are ignored: this is the usual upper bound on the member's code length for :math:`x`.)

**A cross-vocabulary method** (every method: ``gac``, ``unite``, ``deepen``, ``safe``, ``me``):
the teacher-forced code length of the **pivot** member's tokenization :math:`t_1..t_n` of
:math:`x` under the method's combined next-piece distribution :math:`P_k`
(:mod:`jaxens.harness.teacher_forcing`),

.. math::  \mathrm{bpb} = -\frac{1}{|x|}\sum_{k=1}^{n} \log_2 P_k\big(e_k\big).

This is the code length of **one derivation** of :math:`x` (the pivot's tokenization): the
method, run as a generator, could also write :math:`x` in other pieces, whose probability is not
counted.  It is therefore an **upper bound** on the method's code length for :math:`x`, like every
member's bpb, and it is defined for every method.  It differs from the **word-level mixture**
score (:func:`word_mixture_bits_per_byte`, kept under that name): the word mixture codes whole
words with :math:`\sum_i w_i P_i(\text{word})`, each member spelling the word in its own tokens
(the generator that picks a member per word, not the per-piece method); it is a different model,
often lower because it sums over the members' derivations, and it exists only for probability
averaging (GaC/ME), not for UniTE, DeePEn or SAFE.

**Zero mass.**  UniTE (top-:math:`k` candidate union) and SAFE (top-:math:`m` ensemble, same-word
sharpening) can give the observed entry probability zero: those events are counted
(``zero``), the bpb is then :math:`+\infty` (reported as such), and a **smoothed** code length
is reported beside it, :math:`P^\lambda_k = (1-\lambda)P_k(e_k) + \lambda\, p_\pi(t_k\mid t_{<k})`
(mixing with the pivot member's own probability of the token; default
:data:`DEFAULT_LAMBDA` :math:`= 10^{-3}`, which costs at most :math:`-\log_2(1-\lambda) \approx
0.0014` bits per token where the method is finite).

**Batching.**  Long texts are cut at word boundaries into rows of about ``chunk_bytes`` bytes
(:func:`split_rows`), each scored from the context token alone (like a member's bpb of that row);
all rows run together through the decode loop, one pivot position per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxens.combiners.base import normalized_weights
from jaxens.harness.teacher_forcing import context_token, teacher_forced_log_probs
from jaxens.models.forward import token_nll
from jaxens.vocab import make_cross_method
from jaxens.vocab.align import TokenizerView, as_view, common_boundaries, token_offsets, word_boundaries
from jaxens.vocab.cross_decode import CrossMethod

LN2 = float(np.log(2.0))
DEFAULT_LAMBDA = 1e-3


class BPB(NamedTuple):
    bits: float
    num_bytes: int

    @property
    def bpb(self) -> float:
        return self.bits / max(self.num_bytes, 1)


def member_token_nll(member, tokenizer, text: str, chunk: int = 256) -> tuple[np.ndarray, list[int], TokenizerView]:
    """``(nll[n] in nats, ids[n], view)``: the member's NLL of each token of ``text`` (no special tokens)."""
    view = as_view(tokenizer)
    ids = view.encode(text)
    if not ids:
        raise ValueError("text encodes to no tokens")
    nll = token_nll(member, [context_token(view)] + ids, chunk=chunk)
    return np.asarray(nll, np.float64), ids, view


def member_bits_per_byte(member, tokenizer, text: str, chunk: int = 256) -> BPB:
    """Bits per byte of ``text`` under one member."""
    nll, ids, view = member_token_nll(member, tokenizer, text, chunk)
    nbytes = len(view.token_bytes(ids))
    if nbytes != len(text.encode("utf-8")):
        raise ValueError("the tokenizer does not round-trip the text's bytes (unknown characters?)")
    return BPB(float(nll.sum() / LN2), nbytes)


def segment_log_probs(nlls: Sequence[np.ndarray], ids: Sequence[Sequence[int]], views: Sequence[TokenizerView],
                      text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds[S+1], logp[n, S])``: shared word boundaries and each member's log-prob of each segment."""
    cb = set(common_boundaries(views, ids).tolist())
    wb = set(word_boundaries(text).tolist())
    bounds = np.array(sorted(cb & wb | {0, len(text)}), np.int64)
    out = np.zeros((len(views), len(bounds) - 1))
    for i, (nll, tid, v) in enumerate(zip(nlls, ids, views)):
        starts = token_offsets(v, tid)[:-1]
        seg = np.searchsorted(bounds, starts, side="right") - 1
        np.add.at(out[i], seg, -nll)
    return bounds, out


def word_mixture_bits_per_byte(members, tokenizers, text: str, weights=None, chunk: int = 256) -> tuple[BPB, list[BPB]]:
    """``(ensemble BPB, [member BPB])`` of ``text`` under the word-level probability average."""
    n = len(members)
    if n != len(tokenizers) or n == 0:
        raise ValueError(f"got {n} members and {len(tokenizers)} tokenizers")
    w = normalized_weights(weights, n, np.float64, owner="the bpb evaluation")
    res = [member_token_nll(m, t, text, chunk) for m, t in zip(members, tokenizers)]
    x = text.encode("utf-8")
    for nll, ids, v in res:
        if v.token_bytes(ids) != x:
            raise ValueError("a tokenizer does not round-trip the text's bytes (unknown characters?)")
    _, seg = segment_log_probs([r[0] for r in res], [r[1] for r in res], [r[2] for r in res], x)
    with np.errstate(divide="ignore"):
        logw = np.log(w)[:, None]
    mix = np.logaddexp.reduce(logw + seg, axis=0)
    ens = BPB(float(-mix.sum() / LN2), len(x))
    return ens, [BPB(float(r[0].sum() / LN2), len(x)) for r in res]


def split_rows(text: str, chunk_bytes: int | None) -> list[str]:
    """Cut ``text`` at word boundaries (:func:`jaxens.vocab.align.word_boundaries`) into pieces of at
    least ``chunk_bytes`` bytes (the last one may be shorter; ``None``: one piece)."""
    x = text.encode("utf-8")
    if chunk_bytes is None or len(x) <= chunk_bytes:
        return [text] if x else []
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    cuts, last = [0], 0
    for k in word_boundaries(x).tolist()[1:-1]:
        if k - last >= chunk_bytes:
            cuts.append(k)
            last = k
    if len(x) - last < chunk_bytes // 4 and len(cuts) > 1:  # no tiny tail row
        cuts.pop()
    cuts.append(len(x))
    return [x[a:b].decode("utf-8") for a, b in zip(cuts[:-1], cuts[1:])]


class CrossBPB(NamedTuple):
    """Teacher-forced score of a method: ``bits`` (``inf`` when ``zero > 0``), ``num_bytes``, the
    ``zero``-probability count, ``smoothed_bits`` with weight ``lam`` on the pivot member, ``tokens``
    (pivot tokens scored)."""

    bits: float
    num_bytes: int
    zero: int
    smoothed_bits: float
    lam: float
    tokens: int

    @property
    def bpb(self) -> float:
        return self.bits / max(self.num_bytes, 1)

    @property
    def smoothed_bpb(self) -> float:
        return self.smoothed_bits / max(self.num_bytes, 1)


def code_length(logp: Sequence[np.ndarray], pivot_logp: Sequence[np.ndarray], num_bytes: int,
                lam: float = DEFAULT_LAMBDA) -> CrossBPB:
    """:class:`CrossBPB` from per-row log-probs of the observed tokens (nats) and the pivot's."""
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam}")
    a = np.concatenate([np.asarray(x, np.float64) for x in logp]) if logp else np.zeros(0)
    p = np.concatenate([np.asarray(x, np.float64) for x in pivot_logp]) if pivot_logp else np.zeros(0)
    zero = int(np.sum(~np.isfinite(a)))
    bits = float(-a.sum() / LN2) if zero == 0 else float("inf")
    with np.errstate(divide="ignore"):
        sm = np.logaddexp(np.log1p(-lam) + a, np.log(lam) + p)
    return CrossBPB(bits, int(num_bytes), zero, float(-sm.sum() / LN2), float(lam), int(a.size))


def pivot_method(method: str, weights=None, pivot: int = 0, options=None) -> CrossMethod:
    """The cross method ``method`` built with ``options``, the weights ``weights`` and the pivot as
    its main member (``gac``, ``deepen``) or drafter (``safe``) unless the options set them."""
    opts = dict(options or {})
    if weights is not None:
        opts.setdefault("weights", tuple(weights))
    if method == "safe":
        opts.setdefault("drafter", pivot)
    elif method in ("gac", "deepen"):
        opts.setdefault("main", pivot)
    return make_cross_method(method, **opts)


def cross_bits_per_byte(method, members, tokenizers, text: str, weights=None, *, pivot: int = 0,
                        chunk_bytes: int | None = 512, lam: float = DEFAULT_LAMBDA, alignment=None,
                        **options) -> CrossBPB:
    """Teacher-forced bits per byte of ``text`` for a cross-tokenizer method (a name among ``gac``,
    ``unite``, ``deepen``, ``safe``, ``me`` with constructor ``options``, or a :class:`CrossMethod`);
    see the module docstring.  ``text`` is cut into rows of about ``chunk_bytes`` bytes."""
    m = method if not isinstance(method, str) else pivot_method(method, weights, pivot, options)
    rows = split_rows(text, chunk_bytes)
    res = teacher_forced_log_probs(members, tokenizers, {"m": m}, rows, pivot=pivot, alignment=alignment)
    return code_length(res.logp["m"], res.logp["pivot"], sum(res.num_bytes), lam)
