r"""GaC (Generate as Consensus): probability averaging on the union vocabulary.

Member :math:`i` has a sparse 0/1 map :math:`M_i \in \{0,1\}^{v_i \times |\mathcal U|}` onto the union
vocabulary (:class:`jaxens.vocab.align.Alignment`); GaC samples from

.. math::  p_{\mathcal U} = \frac{\sum_i w_i\, \hat p_i M_i}{\sum_i w_i\, \hat p_i M_i \mathbf 1},

where :math:`M_i` is stored as the index array ``to_union[i]`` and :math:`\hat p_i M_i` is a
scatter-add (tokens without text, :math:`M_i` row zero, drop out and the rest renormalises).
Optional **gate** (GaC's speed trick): a row whose main member (``main``) is confident,
:math:`\max_j \hat p_{\text{main},j} \ge \gamma`, uses the main member alone (mapped to the union).
Every member's EOS maps to the union's entry 0.  Source: SOURCES.md §5 (GaC).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxens.combiners.base import check_weights, normalized_weights
from jaxens.vocab.cross_decode import CrossMethod


def to_union_probs(logp: Float[Array, "B v"], to_union: Int[Array, " v"], union_size: int) -> Float[Array, "B U"]:
    """:math:`\\hat p M` for one member: scatter-add of its probabilities along ``to_union`` (``-1`` dropped)."""
    if to_union.shape[0] != logp.shape[-1]:
        raise ValueError(f"to_union has {to_union.shape[0]} entries for log-probs of width {logp.shape[-1]}")
    idx = jnp.where(to_union < 0, union_size, to_union)
    out = jnp.zeros((logp.shape[0], union_size + 1), logp.dtype)
    return out.at[:, idx].add(jnp.exp(logp))[:, :union_size]


def gac_combine(
    logps: Sequence[Float[Array, "B _"]],
    to_union: Sequence[Int[Array, " _"]],
    weights: Float[Array, " n"],
    union_size: int,
    gate: float | None = None,
    main: int = 0,
) -> tuple[Float[Array, "B U"], Array]:
    """``log p_U`` (``-inf`` where zero) and the per-row bool "ensembled" (False where gated)."""
    if len(logps) != len(to_union) or weights.shape != (len(logps),):
        raise ValueError(f"{len(logps)} members, {len(to_union)} maps, weights of shape {weights.shape}")
    q = [to_union_probs(lp, m, union_size) for lp, m in zip(logps, to_union)]
    mix = sum(w * x for w, x in zip(weights, q))
    ens = jnp.ones((logps[0].shape[0],), bool)
    if gate is not None:
        ens = jnp.max(logps[main], axis=-1) < jnp.log(gate)
        mix = jnp.where(ens[:, None], mix, q[main])
    mix = mix / jnp.maximum(jnp.sum(mix, axis=-1, keepdims=True), 1e-30)
    return jnp.where(mix > 0, jnp.log(jnp.where(mix > 0, mix, 1.0)), -jnp.inf), ens


class GaC(CrossMethod):
    """GaC in the cross-tokenizer loop: every member every step, sample on the union vocabulary."""

    def __init__(self, weights=None, gate: float | None = None, main: int = 0):
        check_weights(weights, None, owner="gac")
        self.weights, self.gate, self.main = weights, gate, main

    def setup(self, eng):
        al = eng.alignment
        n = eng.num_members
        w = normalized_weights(self.weights, n, np.float64, owner="gac")
        self._w = jnp.asarray(w, jnp.float32)
        self._maps = tuple(jnp.asarray(m) for m in al.to_union)
        U, gate, main = al.union_size, self.gate, self.main
        self._fn = jax.jit(lambda lps, maps, w: gac_combine(lps, maps, w, U, gate, main))

    def step(self, eng, key):
        lps = [eng.logprobs(i) for i in range(eng.num_members)]
        logp, ens = self._fn(lps, self._maps, self._w)
        u = eng.sample(logp, key)
        pieces = [eng.alignment.piece(x) for x in u]
        return pieces, {"positions": int(eng.active.sum()), "ensembled": int(np.asarray(ens)[eng.active].sum())}
