r"""Bits per byte of held-out text: a tokenizer-independent score for members and cross-vocab ensembles.

**A member.**  The text's bytes :math:`x` are encoded by the member's tokenizer as
:math:`t_1..t_n` after one context token :math:`t_0` (its BOS, else its EOS/document separator);
:math:`\mathrm{bpb} = \sum_{k=1}^{n} -\log_2 p(t_k \mid t_{<k}) / |x|`.  (Other tokenizations of the
same bytes are ignored: this is the usual upper bound on the member's code length for :math:`x`.)

**A cross-vocabulary ensemble** (``word_mixture_bits_per_byte``).  Teacher forcing a combined
model is ill-defined token by token when the members' tokens do not line up, so the ensemble is
scored at the granularity where every tokenization agrees: the text is cut at the *shared word
boundaries* :math:`0 = k_0 < k_1 < \dots < k_S = |x|` (byte offsets that start a whitespace-led
word and are a token boundary of every member, :func:`jaxens.vocab.align.common_boundaries`).
Member :math:`i` gives segment :math:`s` the probability
:math:`P_i(s) = \prod_{t \in s} p_i(t \mid \text{its own tokens before } t)` of its own tokens of the
segment, and the ensemble codes segment :math:`s` with the mixture
:math:`\sum_i w_i P_i(s)`:

.. math::  \mathrm{bpb}_{\text{ens}} = -\frac{1}{|x|}\sum_s \log_2 \sum_i w_i P_i(s).

This is the code length of the *word-level probability average*: the generator that at every word
boundary draws member :math:`i \sim w` and lets it write the next word, which is what ME and GaC
(probability averaging on a union of strings) reduce to when their pieces are whole words; with a
single member (or all weight on one) it equals the member's bpb exactly (the per-segment products
telescope to the chain rule).  It is not defined for DeePEn (a logit search with no normalised
sequence model) or SAFE/UniTE (data-dependent supports); for those use generation quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxens.vocab.align import TokenizerView, as_view, common_boundaries, token_offsets, word_boundaries
from jaxens.vocab.cross_decode import normalized_weights

LN2 = float(np.log(2.0))


class BPB(NamedTuple):
    bits: float
    num_bytes: int

    @property
    def bpb(self) -> float:
        return self.bits / max(self.num_bytes, 1)


def _context_token(view: TokenizerView) -> int:
    if view.bos_id is not None:
        return view.bos_id
    if view.eos_ids:
        return view.eos_ids[0]
    raise ValueError("the tokenizer has neither BOS nor EOS: no context token to start scoring from")


def member_token_nll(member, tokenizer, text: str, chunk: int = 256) -> tuple[np.ndarray, list[int], TokenizerView]:
    """``(nll[n] in nats, ids[n], view)``: the member's NLL of each token of ``text`` (no special tokens)."""
    from jaxens.models.forward import token_nll

    view = as_view(tokenizer)
    ids = view.encode(text)
    if not ids:
        raise ValueError("text encodes to no tokens")
    nll = token_nll(member, [_context_token(view)] + ids, chunk=chunk)
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
    w = normalized_weights(weights, n)
    w = w
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


# methods whose teacher-forced code length is the word-level probability average
_WORD_MIXTURE = ("gac", "me", "prob_average")


def cross_bits_per_byte(method: str, members, tokenizers, text: str, weights=None, chunk: int = 256) -> BPB:
    """Bits per byte of ``text`` for a cross-tokenizer method by name, for the evaluation harness.

    ``gac`` / ``me`` (probability averaging of text pieces) are scored by
    :func:`word_mixture_bits_per_byte`; ``unite``, ``deepen`` and ``safe`` define no normalised
    teacher-forced sequence model (see the module docstring) and raise ``NotImplementedError``.
    """
    if method in _WORD_MIXTURE:
        return word_mixture_bits_per_byte(members, tokenizers, text, weights, chunk)[0]
    if method in ("unite", "deepen", "safe"):
        raise NotImplementedError(
            f"{method} has no normalised teacher-forced likelihood across tokenizers (data-dependent support or a "
            "logit search); score it by generation, or use gac/me for bits per byte"
        )
    raise ValueError(f"unknown cross-tokenizer method {method!r}")
