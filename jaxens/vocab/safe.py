r"""SAFE: selective ensembling across tokenizers (a drafter generates; verifiers are consulted rarely).

Per step and row, with the drafter's next-token distribution :math:`\hat p_d`:

1. **Tokenization gate** (SAFE's "no mismatch at a token boundary"): the row is a *candidate*
   only if its text ends on a boundary every tokenizer shares: the text is complete UTF-8 and the
   next piece starts a word (the drafter's most likely token starts with whitespace or is EOS, or
   the text ends with whitespace).  Both conventions ("Ġ", "▁") put the space at the start of a
   word's first token, so every member's tokenization has a boundary there.
2. **Confidence pre-gate**: candidates with :math:`\max_j \hat p_{d,j} \ge` ``confidence`` keep the
   draft without consulting anyone (the verifiers are not run at all for a step in which no row
   passes; this is where the speed comes from).
3. **Consensus gate**: otherwise the verifiers catch up (one chunked forward of the pending text)
   and the members' distributions are mapped to the union vocabulary; the row is ensembled only
   if they disagree: :math:`\mathrm{TV}(\hat p_d M_d, \hat p_v M_v) = \tfrac12\lVert\cdot\rVert_1 >`
   ``disagreement`` for some verifier :math:`v`.
4. **Ensemble + sharpening**: :math:`p = \sum_i w_i \hat p_i M_i` (GaC); among its top ``m``
   entries, entries whose strings spell the same word (one is a prefix of the other and both start
   with whitespace, e.g. " Ali", " Alice") are one group, and the group's mass moves onto its most
   likely member (the representative).  The sampler then draws from the sharpened top ``m``.

Rows that are not ensembled sample from the drafter alone (on its own vocabulary).
``stats["ensembled"] / stats["positions"]`` is the fraction of positions ensembled.
Source: SOURCES.md §4 (SAFE).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.vocab.align import WHITESPACE, valid_utf8_prefix
from jaxens.vocab.cross_decode import CrossMethod, id_pieces, text_mask, normalized_weights
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


@dataclasses.dataclass
class SAFE(CrossMethod):
    """SAFE settings: ``drafter`` index, ``confidence`` pre-gate, ``disagreement`` (TV) threshold,
    member ``weights`` for the ensemble, ``top_m`` candidates for sharpening."""

    drafter: int = 0
    confidence: float = 0.5
    disagreement: float = 0.5
    weights: tuple | None = None
    top_m: int = 16
    sharpen: bool = True

    def setup(self, eng):
        n = eng.num_members
        if not 0 <= self.drafter < n:
            raise ValueError(f"drafter must be a member index in [0, {n}), got {self.drafter}")
        if not (0 < self.confidence <= 1 and 0 <= self.disagreement <= 1):
            raise ValueError(f"confidence must be in (0, 1] and disagreement in [0, 1], got "
                             f"{self.confidence}, {self.disagreement}")
        w = normalized_weights(self.weights, n)
        al = eng.alignment
        self._w = jnp.asarray(w, jnp.float32)
        self._maps = tuple(jnp.asarray(m) for m in al.to_union)
        dv = eng.view(self.drafter)
        self._dmask = jnp.broadcast_to(jnp.asarray(text_mask(dv)), (eng.B, dv.vocab_size))
        self._starts = np.asarray(dv.starts_word)
        U, d, m = al.union_size, self.drafter, self.top_m

        def consult(lps, maps, w):
            q = [to_union_probs(lp, mp, U) for lp, mp in zip(lps, maps)]
            tv = jnp.stack([0.5 * jnp.sum(jnp.abs(q[d] - x), axis=-1) for x in q])  # (n, B)
            mix = sum(wi * x for wi, x in zip(w, q))  # GaC (gac_combine) without a second scatter
            vals, idx = jax.lax.top_k(mix, m)
            vals = vals / jnp.maximum(jnp.sum(mix, axis=-1, keepdims=True), 1e-30)
            return jnp.max(tv, axis=0), jnp.log(jnp.maximum(vals, 1e-30)), idx

        self._consult = jax.jit(consult)

    def step(self, eng, key):
        d = self.drafter
        lp_d = eng.logprobs(d)
        top = np.asarray(jnp.max(lp_d, axis=-1))
        arg = np.asarray(jnp.argmax(lp_d, axis=-1))
        B = eng.B
        cand = np.zeros((B,), bool)
        for b in range(B):
            t = eng.texts[b]
            complete = valid_utf8_prefix(t) == len(t)
            at_word = (len(t) > 0 and t[-1] in WHITESPACE) or bool(self._starts[arg[b]]) or int(arg[b]) in eng.view(d).eos_ids
            cand[b] = eng.active[b] and complete and at_word
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
                al = eng.alignment
                logq = np.full(vals.shape, -np.inf)
                for b in np.nonzero(ens)[0]:
                    p = np.exp(vals[b])
                    if self.sharpen:
                        p = sharpen(p, [al.piece(u) for u in idx[b]])
                    logq[b] = np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf)
                logq[~ens] = 0.0  # placeholder rows (not used)
                pick = eng.sample(jnp.asarray(logq, jnp.float32), k2)
                for b in np.nonzero(ens)[0]:
                    pieces[b] = al.piece(idx[b, pick[b]])
        act = eng.active
        return pieces, {
            "positions": int(act.sum()),
            "candidates": int(cand.sum()),
            "consulted": int(uncertain.sum()),
            "ensembled": int(ens.sum()),
        }
