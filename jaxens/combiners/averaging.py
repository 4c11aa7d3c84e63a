r"""The classic combiners: weighted logit averaging and weighted probability averaging.

* Logit (geometric) averaging:
  :math:`\log p \propto \sum_i w_i \log \hat p_i`  (a product of experts; a token that any
  member with :math:`w_i > 0` rules out, :math:`\hat p_{ij} = 0`, gets :math:`p_j = 0`).
* Probability (arithmetic) averaging:
  :math:`p = \sum_i w_i \hat p_i / \sum_i w_i` (a mixture; exactly what ME samples from).

Both are jit/vmap friendly, differentiable in the logits and the weights, and never return
NaN: a row whose logits contain NaN or ``+inf`` returns the uniform distribution and is flagged
in ``info.nonfinite``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxens.combiners.base import AveragingInfo, Combiner, EmptyState, check_member_logits, normalized_weights
from jaxens.objectives import over_members


def _member_log_probs(logits: Sequence[ArrayLike], temperature) -> tuple[Array, Array]:
    x = jnp.stack(logits, axis=1).astype(jnp.promote_types(logits[0].dtype, jnp.float32))  # (B, n, v)
    bad = jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=(1, 2))
    x = jnp.where(jnp.isnan(x) | (x == jnp.inf), 0.0, x)
    return jax.nn.log_softmax(x / temperature, axis=-1), bad


def _finish(logp: Array, bad: Array) -> Array:
    v = logp.shape[-1]
    uniform = jnp.full_like(logp, -jnp.log(jnp.asarray(v, logp.dtype)))
    return jnp.where(bad[:, None], uniform, logp)


def combine_logit_average(logits, weights=None, temperature=1.0):
    """``log_softmax(sum_i w_i log_softmax(l_i / T))`` for logits ``(B, v)`` each."""
    _, _ = check_member_logits(logits)
    lp, bad = _member_log_probs(logits, temperature)
    w = normalized_weights(weights, len(logits), lp.dtype)
    # 0 * (-inf) would be NaN: members with zero weight do not vote.
    terms = jnp.where(w[None, :, None] == 0, 0.0, w[None, :, None] * lp)
    mixed = over_members(jnp.add, terms, axis=1)
    allmasked = jnp.all(mixed == -jnp.inf, axis=-1)
    bad = bad | allmasked
    mixed = jnp.where(allmasked[:, None], 0.0, mixed)
    return _finish(jax.nn.log_softmax(mixed, axis=-1), bad), AveragingInfo(bad)


def combine_prob_average(logits, weights=None, temperature=1.0):
    """``log sum_i (w_i / sum w) softmax(l_i / T)`` for logits ``(B, v)`` each."""
    _, _ = check_member_logits(logits)
    lp, bad = _member_log_probs(logits, temperature)
    w = normalized_weights(weights, len(logits), lp.dtype)
    logw = jnp.log(w)
    mixed = jax.nn.logsumexp(lp + logw[None, :, None], axis=1)
    allmasked = jnp.all(mixed == -jnp.inf, axis=-1)
    bad = bad | allmasked
    mixed = jnp.where(allmasked[:, None], 0.0, mixed)
    return _finish(mixed, bad), AveragingInfo(bad)


def logit_average(weights: Float[ArrayLike, " n"] | Sequence[float] | None = None, temperature: float | Float[Array, ""] = 1.0) -> Combiner:
    r"""Weighted logit averaging (geometric mean of the members' distributions).

    .. math::  \log p = \mathrm{log\_softmax}\Big(\sum_i \tilde w_i\, \mathrm{log\_softmax}(\ell_i / T)\Big),
               \qquad \tilde w = w / \textstyle\sum_k w_k \ (\text{uniform when } w = \text{None}).

    Example::

        comb = logit_average(jnp.array([0.7, 0.3]))
        log_p, _, info = comb.combine([l1, l2], comb.init(B))     # (B, v)
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0) and not isinstance(temperature, jax.Array):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")

    def combine(logits, state):
        logp, info = combine_logit_average(logits, weights, temperature)
        return logp, state, info

    return Combiner(lambda batch_size: EmptyState(), combine)


def prob_average(weights: Float[ArrayLike, " n"] | Sequence[float] | None = None, temperature: float | Float[Array, ""] = 1.0) -> Combiner:
    r"""Weighted probability averaging (the mixture that ME samples exactly).

    .. math::  p = \sum_i \tilde w_i\, \mathrm{softmax}(\ell_i / T), \qquad
               \tilde w = w / \textstyle\sum_k w_k \ (\text{uniform when } w = \text{None}).

    Example::

        comb = prob_average(jnp.array([0.5, 0.5]), temperature=0.8)
        log_p, _, info = comb.combine([l1, l2], comb.init(B))     # (B, v)
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0) and not isinstance(temperature, jax.Array):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")

    def combine(logits, state):
        logp, info = combine_prob_average(logits, weights, temperature)
        return logp, state, info

    return Combiner(lambda batch_size: EmptyState(), combine)
