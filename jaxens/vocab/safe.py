r"""SAFE: selective ensembling across tokenizers (a drafter generates; verifiers check blocks).

**Verification test** (per drafted position, row text :math:`x`, drafter distribution :math:`\hat p_d`):

1. **Tokenization gate** (SAFE's "no mismatch at a token boundary"): the position is a *candidate*
   only if :math:`x` ends on a boundary every tokenizer shares: :math:`x` is complete UTF-8 and the
   next piece starts a word (the drafter's most likely token starts with whitespace or is EOS, or
   :math:`x` ends with whitespace).  Both conventions ("Ġ", "▁") put the space at the start of a
   word's first token, so every member's tokenization has a boundary there.
2. **Confidence pre-gate**: candidates with :math:`\max_j \hat p_{d,j} \ge` ``confidence`` keep the
   draft without consulting anyone.
3. **Consensus gate**: otherwise (*consulted*) the members' distributions at :math:`x` are mapped to
   the union vocabulary; the position is *ensembled* only if they disagree:
   :math:`\mathrm{TV}(\hat p_d M_d, \hat p_v M_v) = \tfrac12\lVert\cdot\rVert_1 >` ``disagreement``
   for some verifier :math:`v`.
4. **Ensemble + sharpening**: :math:`p = \sum_i w_i \hat p_i M_i` (GaC); among its top ``m``
   entries, entries whose strings spell the same word (one is a prefix of the other and both start
   with whitespace, e.g. " Ali", " Alice") are one group, and the group's mass moves onto its most
   likely member (the representative).  The sampler then draws from the sharpened top ``m``.

Positions that are not ensembled take the drafter's token (sampled on its own vocabulary).

**Block verification** (``verify_block = K > 1``, the default; SAFE's generate-then-verify): the
drafter generates up to ``K`` tokens alone (one forward per token, as any decoder); then each
verifier scores the whole drafted block in **one** chunked forward: its KV cache is extended by the
re-encoding of the drafted text, and its log-probs are read at every consulted position (the
position whose token prefix spells the text before the drafted token).  The test above runs on
every drafted position; the drafted tokens are accepted up to the first ensembled position, whose
token is drawn from the ensembled (sharpened) distribution instead; everything after it is dropped.
The next block starts from the accepted text: each member's token stream is re-synced to it, which
retracts the dropped tokens (their cache slots are masked, positions count kept tokens only; see
:mod:`jaxens.vocab.cross_decode`), so the caches roll back without copying.

A verifier's tokens at a consulted position must be a prefix of its tokens at the next consulted
one to be read from the same chunk.  When they are not (a drafted piece ends with whitespace that
the verifier merges into the next word, "▁" + "cat" vs "▁cat"), the block is verified only up to
that position and the rest is drafted again.  ``verify_block=1`` is the step-by-step reference
(draft one token, consult the verifiers on it); with greedy sampling both produce the same tokens.

**Batches.**  Rows keep their own queues of accepted pieces (per-row lengths): every step hands
out one queued piece per row, so a row that accepts 7 tokens does not wait for a row that accepted
1.  A block is drafted when some active row's queue is empty; every active row whose queue is
shorter than ``K`` drafts in it too (from its text plus its queue), since the drafter's and
verifiers' forwards are batched over all rows anyway (rows with nothing to feed are masked).
No row drafts past the decoder's ``max_new_tokens``.  The consensus gate runs on the ``k``-th
consulted position of every row at once (the stepwise variant's ``B``-row shape), ``k = 0, 1,
...``, until each row's first ensembled position, so it never costs more than stepwise.  With
sampling, drafted position ``j`` of a round uses ``fold_in(key, j)``, so sampled texts differ
from the stepwise variant's (greedy texts are the same).

**Cost model.**  Stepwise SAFE runs one verifier forward per step in which some row is consulted;
block SAFE runs one verifier forward per round, of ``T`` ~ ``K`` tokens, but drafts tokens that an
ensembled position throws away.  On an accelerator a ``T``-token chunk costs about one token's
forward (memory bound), so the verifier cost drops by up to ``K``; on a CPU the chunk costs
~``T`` times the head (every chunk position gets logits; the member contract selects one
position or all), so the gain is smaller (``benchmarks/safe_speed.py``).

``stats``: ``positions`` (tokens emitted), ``candidates``, ``consulted``, ``ensembled`` (so
``ensembled / positions`` is the fraction of positions ensembled), ``rounds`` (blocks drafted),
``drafted`` (drafter tokens, accepted or not); the verifier forward calls are
``stats["forward_calls"][v]``.
Source: SOURCES.md §4 (SAFE).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxens.combiners.base import check_weights, normalized_weights
from jaxens.vocab.align import WHITESPACE, retokenize_tail, valid_utf8_prefix
from jaxens.vocab.cross_decode import CrossMethod, id_pieces, text_mask
from jaxens.vocab.union import to_union_probs


def sharpen(probs: np.ndarray, strings: list) -> np.ndarray:
    """Consolidate the mass of same-word entries onto the most likely one (host side, one row).

    ``probs``: ``(m,)`` probabilities of ``m`` candidates sorted in descending order;
    ``strings``: their byte strings (``None`` = EOS).  Returns the sharpened ``(m,)`` (same total).
    """
    m = len(strings)
    owner = list(range(m))
    for j in range(m):
        sj = strings[j]
        if sj is None or not sj or sj[0] not in WHITESPACE or len(sj.strip()) == 0:
            continue
        for i in range(j):  # i is more likely than j
            si = strings[owner[i]]
            if si is None or not si or si[0] not in WHITESPACE or len(si.strip()) == 0:
                continue
            if si.startswith(sj) or sj.startswith(si):
                owner[j] = owner[i]
                break
    out = np.zeros_like(probs)
    for j in range(m):
        out[owner[j]] += probs[j]
    return out


_MULTI: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _multi_forward(fwd):
    """A member's compiled chunk forward that returns log-probs at ``G`` chunk positions per row:
    ``(state, tokens, positions, cache, index, kv_mask, gather[B, G]) -> (log p[B, G, v], cache)``."""
    f = _MULTI.get(fwd)
    if f is None:
        graphdef, vocab = fwd.graphdef, fwd.vocab

        def run(state, tokens, positions, cache, index, kv_mask, gather):
            model = nnx.merge(graphdef, state)
            logits, cache = model(tokens, positions, cache, index, kv_mask)
            lg = jnp.take_along_axis(logits, gather[:, :, None], axis=1)[..., :vocab]
            return jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1), cache

        f = jax.jit(run, donate_argnums=(3,))
        _MULTI[fwd] = f
    return f


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _common_prefix(a, b) -> int:
    c = 0
    while c < min(len(a), len(b)) and a[c] == b[c]:
        c += 1
    return c


def _rollback(s, texts) -> None:
    """Truncate a member's token stream (a :class:`~jaxens.vocab.cross_decode._Stream`) to tokens
    that spell a prefix of each row's text, retracting one more token so that the next sync
    re-feeds it (fresh log-probs); dropped tokens' cache slots are masked."""
    for b, t in enumerate(texts):
        ids = s.gen_ids[b]
        if s.view.token_bytes(ids) == t[: len(s.view.token_bytes(ids))]:
            continue
        k, n = 0, 0
        while k < len(ids):
            piece = s.view.strings[ids[k]] or b""
            if t[n: n + len(piece)] != piece:
                break
            n += len(piece)
            k += 1
        k = max(k - 1, 0)
        for slot in s.gen_slots[b][k:]:
            s.kv_mask[b, slot] = False
        s.gen_ids[b] = s.gen_ids[b][:k]
        s.gen_slots[b] = s.gen_slots[b][:k]


@dataclasses.dataclass
class SAFE(CrossMethod):
    """SAFE settings: ``drafter`` index, ``confidence`` pre-gate, ``disagreement`` (TV) threshold,
    member ``weights`` for the ensemble, ``top_m`` candidates for sharpening, ``verify_block``
    drafted tokens per verification (1: the step-by-step reference)."""

    drafter: int = 0
    confidence: float = 0.5
    disagreement: float = 0.5
    weights: tuple | None = None
    top_m: int = 16
    sharpen: bool = True
    verify_block: int = 4

    def __post_init__(self):
        check_weights(self.weights, None, owner="safe")

    def setup(self, eng):
        n = eng.num_members
        if not 0 <= self.drafter < n:
            raise ValueError(f"drafter must be a member index in [0, {n}), got {self.drafter}")
        if not (0 < self.confidence <= 1 and 0 <= self.disagreement <= 1):
            raise ValueError(f"confidence must be in (0, 1] and disagreement in [0, 1], got "
                             f"{self.confidence}, {self.disagreement}")
        if int(self.verify_block) != self.verify_block or self.verify_block < 1:
            raise ValueError(f"verify_block must be a positive integer (1 = stepwise), got {self.verify_block}")
        w = normalized_weights(self.weights, n, np.float64, owner="safe")
        al = eng.alignment
        self._w = jnp.asarray(w, jnp.float32)
        dv = eng.view(self.drafter)
        self._dmask = jnp.broadcast_to(jnp.asarray(text_mask(dv)), (eng.B, dv.vocab_size))
        self._starts = np.asarray(dv.starts_word)
        U, d, m = al.union_size, self.drafter, self.top_m
        key = (U, d, m)
        if getattr(self, "_jit_al", None) is not al or self._jit_key != key:  # one compile per alignment, not per call
            self._maps = tuple(jnp.asarray(mp) for mp in al.to_union)

            def consult(lps, maps, w):
                q = [to_union_probs(lp, mp, U) for lp, mp in zip(lps, maps)]
                tv = jnp.stack([0.5 * jnp.sum(jnp.abs(q[d] - x), axis=-1) for x in q])  # (n, B)
                mix = sum(wi * x for wi, x in zip(w, q))  # GaC (gac_combine) without a second scatter
                vals, idx = jax.lax.top_k(mix, m)
                vals = vals / jnp.maximum(jnp.sum(mix, axis=-1, keepdims=True), 1e-30)
                return jnp.max(tv, axis=0), jnp.log(jnp.maximum(vals, 1e-30)), idx

            self._consult = jax.jit(consult)
            self._jit_al, self._jit_key = al, key
        self._queue = [collections.deque() for _ in range(eng.B)]
        self._emitted = np.zeros((eng.B,), np.int64)
        self._max_new = getattr(eng, "max_new_tokens", None)
        self._prompt_logp = [s.logp for s in eng.streams]  # next-token log-probs after the prompt

    # ------------------------------------------------------------ shared pieces

    def _candidate(self, eng, text: bytes, arg: int | np.integer) -> bool:
        complete = valid_utf8_prefix(text) == len(text)
        at_word = (len(text) > 0 and text[-1] in WHITESPACE) or bool(self._starts[arg]) or \
            int(arg) in eng.view(self.drafter).eos_ids
        return complete and at_word

    def _ensembled_pieces(self, eng, rows, vals, idx, key) -> dict:
        """Sample one union entry per row in ``rows`` from its sharpened top-``m`` (``vals``, ``idx``: ``(N, m)``,
        ``rows``: row ``b`` -> index into them)."""
        al = eng.alignment
        logq = np.zeros((eng.B, vals.shape[1]))
        for b, r in rows.items():
            p = np.exp(vals[r])
            if self.sharpen:
                p = sharpen(p, [al.piece(u) for u in idx[r]])
            logq[b] = np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf)
        pick = eng.sample(jnp.asarray(logq, jnp.float32), key)
        return {b: al.piece(idx[r, pick[b]]) for b, r in rows.items()}

    def step(self, eng, key):
        if self.verify_block == 1:
            return self._step_stepwise(eng, key)
        return self._step_block(eng, key)

    # ------------------------------------------------------------ stepwise reference (verify_block=1)

    def _step_stepwise(self, eng, key):
        d = self.drafter
        lp_d = eng.logprobs(d)
        top = np.asarray(jnp.max(lp_d, axis=-1))
        arg = np.asarray(jnp.argmax(lp_d, axis=-1))
        B = eng.B
        cand = np.array([bool(eng.active[b]) and self._candidate(eng, eng.texts[b], arg[b]) for b in range(B)])
        uncertain = cand & (np.exp(top) < self.confidence)
        k1, k2 = jax.random.split(key)
        ids = eng.sample(lp_d, k1, self._dmask)
        pieces = id_pieces(eng.view(d), ids)
        ens = np.zeros((B,), bool)
        if uncertain.any():
            lps = [eng.logprobs(i) for i in range(eng.num_members)]
            tv, vals, idx = self._consult(lps, self._maps, self._w)
            tv, vals, idx = np.asarray(tv), np.asarray(vals, np.float64), np.asarray(idx)
            ens = uncertain & (tv > self.disagreement)
            if ens.any():
                for b, p in self._ensembled_pieces(eng, {int(b): int(b) for b in np.nonzero(ens)[0]}, vals, idx,
                                                   k2).items():
                    pieces[b] = p
        act = eng.active
        return pieces, {
            "positions": int(act.sum()),
            "candidates": int(cand.sum()),
            "consulted": int(uncertain.sum()),
            "ensembled": int(ens.sum()),
            "rounds": int(act.sum() > 0),
            "drafted": int(act.sum()),
        }

    # ------------------------------------------------------------ block verification

    def _step_block(self, eng, key):
        B = eng.B
        K = int(self.verify_block)
        info = {"positions": 0, "candidates": 0, "consulted": 0, "ensembled": 0, "rounds": 0, "drafted": 0}
        if any(bool(eng.active[b]) and not self._queue[b] for b in range(B)):
            # rows with a short queue ride along (the forwards are batched anyway)
            rows = np.array([bool(eng.active[b]) and len(self._queue[b]) < K for b in range(B)])
            info["rounds"] = 1
            info["drafted"] = self._round(eng, key, rows)
        pieces = [None] * B
        for b in range(B):
            if eng.active[b]:
                pieces[b], (c, u, e) = self._queue[b].popleft()
                self._emitted[b] += 1
                info["positions"] += 1
                info["candidates"] += int(c)
                info["consulted"] += int(u)
                info["ensembled"] += int(e)
        return pieces, info

    def _round(self, eng, key, rows: np.ndarray) -> int:
        """Draft up to ``verify_block`` tokens for ``rows``, verify them, queue the accepted pieces."""
        d, K, B = self.drafter, int(self.verify_block), eng.B
        dv, ds = eng.view(d), eng.streams[d]
        text = [eng.texts[b] + b"".join(p for p, _ in self._queue[b] if p is not None) for b in range(B)]
        for s in eng.streams:  # drop drafted (and verified) tokens that were not accepted
            _rollback(s, text)
        # never draft past the decoder's max_new_tokens (the loop would drop those tokens)
        left = np.full((B,), K) if self._max_new is None else np.array(
            [self._max_new - self._emitted[b] - len(self._queue[b]) for b in range(B)])
        drafting = rows & (left > 0)
        at_text = [[] for _ in range(B)]  # text before each drafted position
        at_piece, at_cand, at_unc = ([[] for _ in range(B)] for _ in range(3))
        lp_hist = []
        drafted = 0
        for j in range(K):
            if not drafting.any():
                break
            ds.sync(text)
            lp = ds.logp
            empty = np.array([len(g) == 0 for g in ds.gen_ids])
            if empty.any():  # no generated token (left): the prompt's next-token distribution
                lp = jnp.where(jnp.asarray(empty)[:, None], self._prompt_logp[d], lp)
            top = np.asarray(jnp.max(lp, axis=-1))
            arg = np.asarray(jnp.argmax(lp, axis=-1))
            ids = eng.sample(lp, jax.random.split(jax.random.fold_in(key, j))[0], self._dmask)
            pcs = id_pieces(dv, ids)
            lp_hist.append(lp)
            for b in np.nonzero(drafting)[0]:
                c = self._candidate(eng, text[b], arg[b])
                at_text[b].append(text[b])
                at_piece[b].append(pcs[b])
                at_cand[b].append(c)
                at_unc[b].append(c and bool(np.exp(top[b]) < self.confidence))
                drafted += 1
                if pcs[b] is None or len(at_piece[b]) >= left[b]:
                    drafting[b] = False
                if pcs[b] is not None:
                    text[b] = text[b] + pcs[b]
        # consulted positions per row, and how far each verifier's single chunk can verify them
        unc = {b: [j for j, u in enumerate(at_unc[b]) if u] for b in range(B) if rows[b] and any(at_unc[b])}
        limit = {b: len(at_piece[b]) for b in range(B) if rows[b]}
        ens_at, new_piece = {}, {}
        if unc:
            n_ok = {b: len(js) for b, js in unc.items()}
            gathered = {}
            for i in range(eng.num_members):
                if i != d:
                    gathered[i] = self._verify(eng, i, unc, at_text, n_ok)
            for b, js in unc.items():
                if n_ok[b] < len(js):
                    limit[b] = js[n_ok[b]]
            # consult the k-th verified position of every row at once (B rows: the stepwise
            # variant's compiled shape), in order, until the row's first ensembled position
            stack = jnp.stack(lp_hist)  # (J, B, v_d)
            found, val_rows, idx_rows = {}, [], []
            for k in range(max(n_ok[b] for b in unc)):
                live = [b for b in unc if k < n_ok[b] and b not in found]
                if not live:
                    break
                jj, bb = np.zeros(B, np.int32), np.zeros(B, np.int32)
                for b in live:
                    jj[b], bb[b] = unc[b][k], b
                lps = []
                for i in range(eng.num_members):
                    if i == d:
                        lps.append(stack[jnp.asarray(jj), jnp.arange(B)])
                    else:
                        out, where = gathered[i]
                        gg = np.zeros(B, np.int32)
                        for b in live:
                            gg[b] = where[b][k]
                        lps.append(out[jnp.arange(B), jnp.asarray(gg)])
                tv, vals, idx = self._consult(lps, self._maps, self._w)
                tv = np.asarray(tv)
                hit = [b for b in live if tv[b] > self.disagreement]
                if hit:
                    vals, idx = np.asarray(vals, np.float64), np.asarray(idx)
                    for b in hit:
                        found[b] = unc[b][k]
                        val_rows.append(vals[b])
                        idx_rows.append(idx[b])
            if found:
                rows_at = {b: r for r, b in enumerate(found)}
                new_piece = self._ensembled_pieces(eng, rows_at, np.stack(val_rows), np.stack(idx_rows),
                                                   jax.random.split(jax.random.fold_in(key, K))[1])
                ens_at = found
        for b in limit:
            stop = ens_at.get(b, limit[b])
            for j in range(stop):
                self._queue[b].append((at_piece[b][j], (at_cand[b][j], at_unc[b][j], False)))
            if b in ens_at:
                j = ens_at[b]
                self._queue[b].append((new_piece[b], (at_cand[b][j], True, True)))
        return drafted

    def _verify(self, eng, i, unc, at_text, n_ok):
        """One chunked forward of verifier ``i`` over the drafted text; returns its log-probs
        ``(B, G + 1, v_i)`` (entry ``G``: after the prompt) and, per row, the entry of each consulted
        position.  Lowers ``n_ok[b]`` where a consulted prefix is not a prefix of the next one."""
        s = eng.streams[i]
        view, B, G = s.view, eng.B, int(self.verify_block)
        plans = {}
        for b, js in unc.items():
            cur = list(s.gen_ids[b])
            seqs, prev = [], cur
            for j in js[: n_ok[b]]:
                keep, new = retokenize_tail(view, prev, at_text[b][j], 0)
                t = list(prev[:keep]) + list(new)
                if seqs and t[: len(seqs[-1])] != seqs[-1]:
                    break
                seqs.append(t)
                prev = t
            n_ok[b] = len(seqs)
            final = seqs[-1]
            keep = max(0, min(_common_prefix(cur, final), len(seqs[0]) - 1))
            plans[b] = (keep, final[keep:], [len(t) - 1 - keep if t else -1 for t in seqs])
        n_new = max(len(new) for _, new, _ in plans.values())
        prompt = self._prompt_logp[i]
        where = {b: [k if c >= 0 else G for k, c in enumerate(ci)] for b, (_, _, ci) in plans.items()}
        if n_new == 0:  # every consulted position has no generated token yet
            out = jnp.concatenate([jnp.zeros((B, G) + prompt.shape[1:], prompt.dtype), prompt[:, None]], axis=1)
            return out, where
        T = _pow2(n_new)
        s._grow(s.slot + T)
        toks = np.zeros((B, T), np.int32)
        pos = np.zeros((B, T), np.int32)
        gather = np.zeros((B, G), np.int32)
        fed = np.zeros((B,), bool)
        last = np.zeros((B,), np.int32)
        for b, (keep, new, ci) in plans.items():
            for slot in s.gen_slots[b][keep:]:
                s.kv_mask[b, slot] = False
            s.gen_ids[b] = s.gen_ids[b][:keep] + list(new)
            s.gen_slots[b] = s.gen_slots[b][:keep] + list(range(s.slot, s.slot + len(new)))
            pos[b] = len(s.prompt_ids[b]) + keep + np.arange(T)
            if new:
                toks[b, : len(new)] = new
                s.kv_mask[b, s.slot: s.slot + len(new)] = True
                gather[b, : len(ci)] = np.maximum(ci, 0)
                fed[b] = True
                last[b] = len(ci) - 1  # the gather slot of the last token fed
        out, s.cache = _multi_forward(s.fwd)(s.fwd.state, jnp.asarray(toks), jnp.asarray(pos), s.cache,
                                             jnp.int32(s.slot), jnp.asarray(s.kv_mask), jnp.asarray(gather))
        s.slot += T
        s.forward_calls += 1
        s.forward_tokens += int(sum(len(new) for _, new, _ in plans.values()))
        out = jnp.concatenate([out, prompt[:, None]], axis=1)
        lastlp = jnp.take_along_axis(out, jnp.asarray(last)[:, None, None], axis=1)[:, 0]
        s.logp = jnp.where(jnp.asarray(fed)[:, None], lastlp, s.logp)
        return out, where
