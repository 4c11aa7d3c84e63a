r"""Teacher forcing of cross-vocabulary methods through the cross-tokenizer decode loop.

**A cross-vocabulary method, teacher forced** (:func:`teacher_forced_log_probs`;
:func:`jaxens.harness.bpb.cross_bits_per_byte` turns its output into bits per byte; every method: ``gac``, ``unite``, ``deepen``, ``safe``, ``me``).  The
text is tokenized by the **pivot** member :math:`\pi` (member 0, and the method's ``main`` /
``drafter``): :math:`x = s_\pi(t_1) \cdots s_\pi(t_n)`.  At every pivot position :math:`k` the rows
of the decode loop (:class:`jaxens.vocab.cross_decode.CrossEngine`) hold the byte prefix
:math:`x_{<k} = s_\pi(t_1)\cdots s_\pi(t_{k-1})`; the pivot is fed exactly :math:`t_{<k}` (its
KV cache, :meth:`_Stream.force`), every other member is conditioned on **its own re-encoding of the
same bytes**, synced exactly as when the loop appends sampled text
(:func:`jaxens.vocab.align.retokenize_tail`), and the method's combined next-piece distribution
:math:`P_k` is computed by the method's own per-step code (its ``step`` runs on a
:class:`ForcedEngine` whose ``sample`` records the distribution and returns the observed entry;
ME's per-step mixture and SAFE's gates are evaluated exactly, see below).  Then

.. math::  \mathrm{bpb} = -\frac{1}{|x|}\sum_{k=1}^{n} \log_2 P_k\big(e_k\big),

where the observed entry :math:`e_k` is :math:`t_k` itself for methods that sample on the pivot's
vocabulary (DeePEn, SAFE's draft) and the **union entry of the string** :math:`s_\pi(t_k)` for
union-vocabulary methods (GaC, UniTE, SAFE's ensembled rows, ME's piece mixture
:math:`\sum_i w_i \tilde p_i(s)`, :math:`\tilde p_i` member :math:`i` restricted to text tokens
and EOS).  Distributions are the untruncated method distributions at temperature 1 (no
top-k/top-p of the sampler).

:func:`teacher_forced_log_probs` returns :math:`\log P_k(e_k)` for every method and row, and the
pivot member's own :math:`\log p_\pi(t_k \mid t_{<k})` (name ``"pivot"``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jaxens.combiners.base import normalized_weights
from jaxens.sampling import Sampler, apply_mask
from jaxens.vocab.align import WHITESPACE, Alignment, TokenizerView, align, token_offsets, valid_utf8_prefix
from jaxens.vocab.cross_decode import (
    CrossEngine,
    CrossMethod,
    _forward_for,
    _Stream,
    check_member_vocab,
    text_mask,
)
from jaxens.vocab.deepen import DeePEn
from jaxens.vocab.me_cross import MECross
from jaxens.vocab.safe import SAFE, sharpen
from jaxens.vocab.union import GaC, to_union_probs
from jaxens.vocab.unite import UniTE


def context_token(view: TokenizerView) -> int:
    """The token a row is scored from: the tokenizer's BOS, else its first EOS."""
    if view.bos_id is not None:
        return view.bos_id
    if view.eos_ids:
        return view.eos_ids[0]
    raise ValueError("the tokenizer has neither BOS nor EOS: no context token to start scoring from")


@jax.jit
def _target_logp(logp: Float[Array, "B v"], mask, target: Int[Array, " B"]) -> Float[Array, " B"]:
    """``log softmax(apply_mask(logp, mask))[b, target[b]]`` (the sampler's distribution at temperature 1)."""
    x = apply_mask(logp, mask) if mask is not None else logp
    lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]


@jax.jit
def _is_argmax(logp: Float[Array, "B v"], mask, target: Int[Array, " B"]):
    """``argmax apply_mask(logp, mask) == target`` per row (the greedy choice is the observed entry)."""
    x = apply_mask(logp, mask) if mask is not None else logp
    return jnp.argmax(x, axis=-1) == target


class ForcedEngine(CrossEngine):
    """A :class:`CrossEngine` driven by the caller (teacher forcing).

    The caller sets ``texts`` (each row's byte prefix), ``forced`` (the pivot's ids of that prefix)
    and the observed next entry (``target_ids`` on the pivot vocabulary, ``target_union`` on the
    union).  :meth:`logprobs` feeds the pivot exactly ``forced`` and syncs every other member to
    ``texts`` (as generation does); :meth:`sample` records the log-probability the method's
    distribution gives the observed entry and returns that entry.
    """

    def __init__(self, streams, alignment: Alignment | None, B: int, pivot: int):
        super().__init__(streams, alignment, Sampler(), B)
        self.pivot = pivot
        self.forced = [[] for _ in range(B)]
        self.target_ids = np.zeros((B,), np.int32)
        self.target_union = np.zeros((B,), np.int32)
        self.recorded: list = []
        self.greedy: list = []
        self.space: str | None = None  # "union" / "pivot": where the current method samples (None: by width)

    def logprobs(self, i: int) -> jax.Array:
        s = self.streams[i]
        if i == self.pivot:
            s.force(self.forced)
        else:
            s.sync(self.texts)
        return s.logp

    def sample(self, logp, key, mask=None) -> np.ndarray:
        W = int(logp.shape[-1])
        U = self.alignment.union_size if self.alignment is not None else -1
        vp = self.streams[self.pivot].view.vocab_size
        if W == U and self.space in ("union", None) and (W != vp or self.space == "union"):
            tgt = self.target_union
        elif W == vp and self.space in ("pivot", None) and (W != U or self.space == "pivot"):
            tgt = self.target_ids
        else:
            raise NotImplementedError(
                f"a method sampled from a distribution of width {W} (pivot vocabulary {vp}, union {U}): teacher forcing "
                "needs the distribution on the pivot's vocabulary or on the union; use the method's main member as pivot"
            )
        self.recorded.append(_target_logp(logp, mask, jnp.asarray(tgt)))
        self.greedy.append(_is_argmax(logp, mask, jnp.asarray(tgt)))
        return tgt.copy()


class ForcedResult(NamedTuple):
    """Per-row teacher-forced scores.

    ``logp[name][r]``: natural log-probability of each observed pivot token of row ``r`` under
    ``name`` (``"pivot"``: the pivot member alone, raw softmax); ``greedy[name][r]``: whether each
    observed entry is the argmax of that distribution; ``seconds[name]``: time of the
    method's combine (``"pivot"``: 0) and ``member_seconds[i]``: member ``i``'s forwards, both over
    the steps after the first, steps slower than 20x the median counted as the median (compiles, at
    the first step and at new chunk sizes, excluded); ``timed_positions``: positions scored in those steps; ``stats[name]``: method counters (e.g. SAFE's ``ensembled``).
    """

    ids: list
    num_bytes: list
    logp: dict
    seconds: dict
    member_seconds: list
    timed_positions: int
    stats: dict
    greedy: dict | None = None


def _method_pivot(m: CrossMethod) -> int | None:
    for attr in ("drafter", "main"):
        if hasattr(m, attr):
            return int(getattr(m, attr))
    return None


def _me_fn(lps, maps, masks, w, u, union_size):
    tot = 0.0
    mix = 0.0
    for lp, mp, mk, wi in zip(lps, maps, masks, w):
        q = jax.nn.log_softmax(apply_mask(lp, mk), axis=-1)
        tot = tot + wi * jnp.sum(jnp.where(mp[None, :] == u[:, None], jnp.exp(q), 0.0), axis=-1)
        mix = mix + wi * to_union_probs(q, mp, union_size)
    return jnp.log(tot), jnp.argmax(mix, axis=-1) == u


_me_jit = jax.jit(_me_fn, static_argnums=(5,))


class _MEScorer:
    """ME's per-step piece distribution :math:`\\sum_i w_i \\tilde p_i(s)` at the observed string (exact, no draw)."""

    def __init__(self, m: MECross, eng: ForcedEngine):
        n = eng.num_members
        self.w = jnp.asarray(normalized_weights(m.weights, n, jnp.float32, owner="the cross-tokenizer method"))
        self.maps = tuple(jnp.asarray(x) for x in eng.alignment.to_union)
        self.masks = tuple(jnp.broadcast_to(jnp.asarray(text_mask(eng.view(i))), (eng.B, eng.view(i).vocab_size))
                           for i in range(n))

    def __call__(self, eng: ForcedEngine):
        lps = [eng.logprobs(i) for i in range(eng.num_members)]
        lt, greedy = _me_jit(lps, self.maps, self.masks, self.w, jnp.asarray(eng.target_union),
                             eng.alignment.union_size)
        return lt, {"_greedy": greedy}


class _SAFEScorer:
    """SAFE's per-position distribution (the gates of :class:`jaxens.vocab.safe.SAFE`, evaluated at the
    forced prefix): the drafter alone on its text tokens, or, on ensembled rows, the sharpened top-``m``
    GaC mixture (renormalised over the ``m`` entries, as the sampler does)."""

    def __init__(self, m: SAFE, eng: ForcedEngine):
        n = eng.num_members
        self.m, self.d = m, eng.pivot
        dv = eng.view(self.d)
        self.dmask = jnp.broadcast_to(jnp.asarray(text_mask(dv)), (eng.B, dv.vocab_size))
        self.starts = np.asarray(dv.starts_word)
        w = jnp.asarray(normalized_weights(m.weights, n, jnp.float32, owner="the cross-tokenizer method"))
        maps = tuple(jnp.asarray(x) for x in eng.alignment.to_union)
        U, d, top_m = eng.alignment.union_size, self.d, min(int(m.top_m), eng.alignment.union_size)

        def consult(lps):
            q = [to_union_probs(lp, mp, U) for lp, mp in zip(lps, maps)]
            tv = jnp.stack([0.5 * jnp.sum(jnp.abs(q[d] - x), axis=-1) for x in q])
            mix = sum(wi * x for wi, x in zip(w, q))
            vals, idx = jax.lax.top_k(mix, top_m)
            vals = vals / jnp.maximum(jnp.sum(mix, axis=-1, keepdims=True), 1e-30)
            return jnp.max(tv, axis=0), jnp.log(jnp.maximum(vals, 1e-30)), idx

        self.consult = jax.jit(consult)

    def __call__(self, eng: ForcedEngine):
        m, d = self.m, self.d
        lp_d = eng.logprobs(d)
        out = np.array(_target_logp(lp_d, self.dmask, jnp.asarray(eng.target_ids)), np.float64)
        greedy = np.array(_is_argmax(lp_d, self.dmask, jnp.asarray(eng.target_ids)))
        top = np.asarray(jnp.max(lp_d, axis=-1))
        arg = np.asarray(jnp.argmax(lp_d, axis=-1))
        eos = eng.view(d).eos_ids
        cand = np.zeros((eng.B,), bool)
        for b in range(eng.B):
            t = eng.texts[b]
            complete = valid_utf8_prefix(t) == len(t)
            at_word = (len(t) > 0 and t[-1] in WHITESPACE) or bool(self.starts[arg[b]]) or int(arg[b]) in eos
            cand[b] = eng.active[b] and complete and at_word
        uncertain = cand & (np.exp(top) < m.confidence)
        ens = np.zeros((eng.B,), bool)
        zero_outside = zero_sharpened = 0
        if uncertain.any():
            lps = [eng.logprobs(i) for i in range(eng.num_members)]
            tv, vals, idx = self.consult(lps)
            tv, vals, idx = np.asarray(tv), np.asarray(vals, np.float64), np.asarray(idx)
            ens = uncertain & (tv > m.disagreement)
            al = eng.alignment
            for b in np.nonzero(ens)[0]:
                p = np.exp(vals[b])
                if m.sharpen:
                    p = sharpen(p, [al.piece(u) for u in idx[b]])
                hit = idx[b] == eng.target_union[b]
                greedy[b] = bool(hit[int(np.argmax(p))])
                q = p[hit].sum() / p.sum()
                out[b] = np.log(q) if q > 0 else -np.inf
                if q <= 0:
                    zero_sharpened += int(hit.any())  # in the top m, its mass moved to a same-word entry
                    zero_outside += int(not hit.any())  # not among the top m
        return out, {"_greedy": greedy, "consulted": int(uncertain.sum()), "ensembled": int(ens.sum()),
                     "zero_outside_top_m": zero_outside, "zero_sharpened": zero_sharpened}


def _robust_total(steps: Sequence[float]) -> float:
    """Sum of step times with compile outliers (> 20x the median step) replaced by the median."""
    if not steps:
        return 0.0
    t = np.asarray(steps, np.float64)
    med = float(np.median(t))
    return float(np.where(t > 20 * med, med, t).sum())


def teacher_forced_log_probs(members, tokenizers, methods: Mapping[str, CrossMethod], rows: Sequence[str], *,
                             pivot: int = 0, alignment: Alignment | None = None, cache_dtype=None, seed: int = 0,
                             progress: bool = False) -> ForcedResult:
    """Teacher-force every method in ``methods`` (name -> :class:`CrossMethod`) on the texts ``rows``
    (one decode-loop row each), sharing the member forwards; see the module docstring."""
    members = list(members)
    n = len(members)
    if n != len(tokenizers) or n < 2:
        raise ValueError(f"teacher forcing across tokenizers needs >= 2 members with one tokenizer each, got {n} "
                         f"members and {len(tokenizers)} tokenizers")
    if not 0 <= pivot < n:
        raise ValueError(f"pivot must be a member index in [0, {n}), got {pivot}")
    rows = list(rows)
    if not rows or any(not r for r in rows):
        raise ValueError("rows must be a non-empty list of non-empty texts")
    for name, m in methods.items():
        mp = _method_pivot(m)
        if mp is not None and mp != pivot:
            raise ValueError(f"method {name!r} has main/drafter {mp} but the pivot is {pivot}; build it with "
                             f"main={pivot} (drafter={pivot} for SAFE) or pass pivot={mp}")
    al = alignment if alignment is not None else align(tokenizers)
    views = list(al.views)
    B = len(rows)
    pv = views[pivot]
    ids, xs, offs, tu = [], [], [], []
    for r in rows:
        t = pv.encode(r)
        x = r.encode("utf-8")
        if not t or pv.token_bytes(t) != x:
            raise ValueError("the pivot's tokenizer does not round-trip a row's bytes (unknown characters?)")
        u = al.to_union[pivot][np.asarray(t)]
        if np.any(u <= 0):
            raise ValueError("the pivot's tokenization of a row holds a token without text")
        ids.append(t)
        xs.append(x)
        offs.append(token_offsets(pv, t))
        tu.append(u.astype(np.int32))
    K = max(len(t) for t in ids)
    fwds = [_forward_for(m, check_member_vocab(m, v, i)) for i, (m, v) in enumerate(zip(members, views))]
    streams = [_Stream(f, v, cache_dtype) for f, v in zip(fwds, views)]
    for v, s in zip(views, streams):
        s.start([""] * B, reserve=2 * K + 16, prompt_ids=[[context_token(v)]] * B)
    eng = ForcedEngine(streams, al, B, pivot)
    scorers = {}
    for name, m in methods.items():
        m.setup(eng)
        if isinstance(m, MECross):
            scorers[name] = _MEScorer(m, eng)
        elif isinstance(m, SAFE):
            scorers[name] = _SAFEScorer(m, eng)
        else:
            scorers[name] = None  # its own step, with the recording sampler
    spaces = {name: "union" if isinstance(m, (GaC, UniTE)) else "pivot" if isinstance(m, DeePEn) else None
              for name, m in methods.items()}
    names = ["pivot"] + list(methods)
    logp = {k: [np.zeros(len(t)) for t in ids] for k in names}
    greedy = {k: [np.zeros(len(t), bool) for t in ids] for k in names}
    steps_s = {k: [] for k in names}  # per-step seconds (steps after the first)
    member_steps = [[] for _ in range(n)]
    stats = {k: {} for k in methods}
    timed = 0
    key = jax.random.key(seed)
    bar = tqdm(total=K, desc="teacher forcing", disable=not progress, file=sys.stderr, leave=False)
    for k in range(K):
        act = np.array([k < len(t) for t in ids])
        eng.active = act
        eng.texts = [x[: int(o[min(k, len(t))])] for x, o, t in zip(xs, offs, ids)]
        eng.forced = [t[: min(k, len(t))] for t in ids]
        eng.target_ids = np.array([t[min(k, len(t) - 1)] for t in ids], np.int32)
        eng.target_union = np.array([u[min(k, len(u) - 1)] for u in tu], np.int32)
        for i in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(eng.logprobs(i))
            if k > 0:
                member_steps[i].append(time.perf_counter() - t0)
        vals = {"pivot": _target_logp(eng.logprobs(pivot), None, jnp.asarray(eng.target_ids))}
        argmax = {"pivot": _is_argmax(eng.logprobs(pivot), None, jnp.asarray(eng.target_ids))}
        for name, m in methods.items():
            t0 = time.perf_counter()
            key, sub = jax.random.split(key)
            if scorers[name] is not None:
                v, info = scorers[name](eng)
                argmax[name] = info.pop("_greedy")
            else:
                eng.recorded, eng.greedy = [], []
                eng.space = spaces[name]
                _, info = m.step(eng, sub)
                if len(eng.recorded) != 1:
                    raise NotImplementedError(
                        f"method {name!r} sampled {len(eng.recorded)} times in one step; teacher forcing needs one "
                        "combined distribution per step")
                v = eng.recorded[0]
                argmax[name] = eng.greedy[0]
            v = np.asarray(v, np.float64)
            if k > 0:
                steps_s[name].append(time.perf_counter() - t0)
            vals[name] = v
            for c, x in info.items():
                if c in ("consulted", "ensembled", "zero_outside_top_m", "zero_sharpened"):
                    stats[name][c] = stats[name].get(c, 0) + x
        for name, v in vals.items():
            v = np.asarray(v, np.float64)
            g = np.asarray(argmax[name])
            for b in np.nonzero(act)[0]:
                logp[name][b][k] = v[b]
                greedy[name][b][k] = g[b]
        if k > 0:
            timed += int(act.sum())
        bar.update(1)
    bar.close()
    seconds = {k: _robust_total(v) for k, v in steps_s.items()}
    member_seconds = [_robust_total(v) for v in member_steps]
    return ForcedResult(ids, [len(x) for x in xs], logp, seconds, member_seconds, timed, stats, greedy)
