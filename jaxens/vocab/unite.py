r"""UniTE: ensemble on the union of the members' top-k tokens.

Each member proposes its :math:`k` most likely tokens; the candidate set is the union
:math:`C = \bigcup_i \{u(j) : j \in \text{top-}k(\hat p_i)\}` in the union vocabulary.  Member
:math:`i` scores a candidate :math:`c` by :math:`\hat p_i(c)` when :math:`c` is in its vocabulary,
otherwise by the probability of its *first sub-token* (the longest prefix of :math:`c`'s string in
its vocabulary, ``Alignment.first_sub``; UniTE re-tokenizes the string and takes the first
token, which is the same token whenever the member's tokenizer splits greedily from the left).
Then :math:`p(c) \propto \sum_i w_i\, \hat p_i(\mathrm{first}_i(c))` on :math:`C`, zero elsewhere.
Source: SOURCES.md §5 (UniTE, k = 10).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxens.combiners.base import check_weights, normalized_weights
from jaxens.vocab.cross_decode import CrossMethod


def unite_combine(
    logps: Sequence[Float[Array, "B _"]],
    to_union: Sequence[Int[Array, " _"]],
    first_sub: Sequence[Int[Array, " U"]],
    weights: Float[Array, " n"],
    k: int = 10,
) -> Float[Array, "B U"]:
    """``log p`` on the union vocabulary: finite exactly on the candidate set."""
    U = first_sub[0].shape[0]
    B = logps[0].shape[0]
    cand = jnp.zeros((B, U + 1), bool)
    for lp, m in zip(logps, to_union):
        if k > lp.shape[-1]:
            raise ValueError(f"k={k} exceeds a member vocabulary of {lp.shape[-1]}")
        top = jax.lax.top_k(lp, k)[1]
        u = m[top]
        cand = cand.at[jnp.arange(B)[:, None], jnp.where(u < 0, U, u)].set(True)
    cand = cand[:, :U]
    score = sum(w * jnp.exp(lp)[:, fs] for w, lp, fs in zip(weights, logps, first_sub))
    score = jnp.where(cand, score, 0.0)
    score = score / jnp.maximum(jnp.sum(score, axis=-1, keepdims=True), 1e-30)
    return jnp.where(score > 0, jnp.log(jnp.where(score > 0, score, 1.0)), -jnp.inf)


class UniTE(CrossMethod):
    """UniTE in the cross-tokenizer loop (every member every step)."""

    def __init__(self, weights=None, k: int = 10):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        check_weights(weights, None, owner="unite")
        self.weights, self.k = weights, k

    def setup(self, eng):
        al = eng.alignment
        n = eng.num_members
        w = normalized_weights(self.weights, n, np.float64, owner="unite")
        self._w = jnp.asarray(w, jnp.float32)
        self._maps = tuple(jnp.asarray(m) for m in al.to_union)
        self._fs = tuple(jnp.asarray(f) for f in al.first_sub)
        k = self.k
        self._fn = jax.jit(lambda lps, maps, fs, w: unite_combine(lps, maps, fs, w, k))

    def step(self, eng, key):
        lps = [eng.logprobs(i) for i in range(eng.num_members)]
        logp = self._fn(lps, self._maps, self._fs, self._w)
        u = eng.sample(logp, key)
        return [eng.alignment.piece(x) for x in u], {"positions": int(eng.active.sum())}
