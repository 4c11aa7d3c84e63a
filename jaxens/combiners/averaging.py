r"""The classic combiners: weighted logit averaging and weighted probability averaging.

* Logit (geometric) averaging:
  :math:`\log p \propto \sum_i w_i \log \hat p_i`  (a product of experts; a token that any
  member with :math:`w_i > 0` rules out, :math:`\hat p_{ij} = 0`, gets :math:`p_j = 0`).
* Probability (arithmetic) averaging:
  :math:`p = \sum_i w_i \hat p_i / \sum_i w_i` (a mixture; exactly what ME samples from).

Both are jit/vmap friendly, differentiable in the logits and the weights, and never return
NaN.  A member whose row holds NaN / ``+inf`` or masks every token is dropped from that row (the
other members are combined, weights renormalised; uniform when none is left) and the row's
``info.status`` is ``NONFINITE_INPUT`` with ``info.bad_members`` naming the member
(:class:`~jaxens.combiners.base.AveragingInfo`).  Weights are checked when the combiner is built
(:func:`~jaxens.combiners.base.check_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxens.combiners.base import (
    AveragingInfo,
    Combiner,
    EmptyState,
    check_member_logits,
    check_weights,
    normalized_weights,
)
from jaxens.objectives import over_members, unusable_rows
from jaxens.solvers.solution import Status


def _member_log_probs(logits: Sequence[ArrayLike], temperature) -> tuple[Array, Array]:
    """Member log-probs ``(B, n, v)`` and the unusable rows ``(B, n)``: NaN / ``+inf`` anywhere, or
    every token ``-inf`` (such a row is zeroed so that nothing downstream sees NaN)."""
    x = jnp.stack(logits, axis=1).astype(jnp.promote_types(logits[0].dtype, jnp.float32))  # (B, n, v)
    bad = unusable_rows(x)
    x = jnp.where(bad[..., None], 0.0, x)
    return jax.nn.log_softmax(x / temperature, axis=-1), bad


def _row_weights(weights, bad: Array, dtype, owner: str) -> tuple[Array, Array]:
    """Per-row weights ``(B, n)``: the usable members' weights renormalised; and the rows with no
    usable member of positive weight."""
    w = normalized_weights(weights, bad.shape[1], dtype, owner=owner)
    wb = jnp.where(bad, 0.0, jnp.asarray(w, dtype)[None, :])
    total = jnp.sum(wb, axis=-1)
    none_left = total <= 0
    return wb / jnp.where(none_left, 1.0, total)[:, None], none_left


def _safe_log(w: Array) -> Array:
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def _mixture(lp: Array, wb: Array) -> Array:
    """``log sum_i wb_i p_i`` per row (``-inf`` where no member allows the token)."""
    return jax.nn.logsumexp(lp + _safe_log(wb)[..., None], axis=1)


def _finish(logp: Array, bad: Array, none_left: Array, empty: Array) -> tuple[Array, AveragingInfo]:
    v = logp.shape[-1]
    uniform = jnp.full_like(logp, -jnp.log(jnp.asarray(v, logp.dtype)))
    nonfinite = jnp.any(bad, axis=-1)
    status = jnp.where(nonfinite, Status.NONFINITE_INPUT, jnp.where(empty, Status.INFEASIBLE, Status.SOLVED))
    return jnp.where(none_left[:, None], uniform, logp), AveragingInfo(status.astype(jnp.int32), bad, nonfinite)


def combine_logit_average(logits, weights=None, temperature=1.0):
    """``log_softmax(sum_i w_i log_softmax(l_i / T))`` for logits ``(B, v)`` each (see :class:`AveragingInfo`
    for rows with unusable members or an empty product)."""
    _, _ = check_member_logits(logits)
    lp, bad = _member_log_probs(logits, temperature)
    wb, none_left = _row_weights(weights, bad, lp.dtype, "logit_average")
    # 0 * (-inf) would be NaN: members with zero weight do not vote.
    terms = jnp.where(wb[..., None] == 0, 0.0, wb[..., None] * lp)
    mixed = over_members(jnp.add, terms, axis=1)
    empty = jnp.all(mixed == -jnp.inf, axis=-1) & ~none_left
    mixed = jax.nn.log_softmax(jnp.where(empty[:, None], 0.0, mixed), axis=-1)
    mixed = jnp.where(empty[:, None], _mixture(lp, wb), mixed)
    return _finish(mixed, bad, none_left, empty)


def combine_prob_average(logits, weights=None, temperature=1.0):
    """``log sum_i (w_i / sum w) softmax(l_i / T)`` for logits ``(B, v)`` each (see :class:`AveragingInfo`)."""
    _, _ = check_member_logits(logits)
    lp, bad = _member_log_probs(logits, temperature)
    wb, none_left = _row_weights(weights, bad, lp.dtype, "prob_average")
    mixed = jnp.where(none_left[:, None], 0.0, _mixture(lp, wb))
    return _finish(mixed, bad, none_left, jnp.zeros_like(none_left))


def _check_factory(weights, temperature, owner: str) -> None:
    check_weights(weights, None, owner=owner)  # values now; the length when the members are known
    if not (isinstance(temperature, (int, float)) and temperature > 0) and not isinstance(temperature, jax.Array):
        raise ValueError(f"{owner}: temperature must be > 0, got {temperature!r}")


def logit_average(weights: Float[ArrayLike, " n"] | Sequence[float] | None = None, temperature: float | Float[Array, ""] = 1.0) -> Combiner:
    r"""Weighted logit averaging (geometric mean of the members' distributions).

    .. math::  \log p = \mathrm{log\_softmax}\Big(\sum_i \tilde w_i\, \mathrm{log\_softmax}(\ell_i / T)\Big),
               \qquad \tilde w = w / \textstyle\sum_k w_k \ (\text{uniform when } w = \text{None}).

    Example::

        comb = logit_average(jnp.array([0.7, 0.3]))
        log_p, _, info = comb.combine([l1, l2], comb.init(B))     # (B, v)
    """
    _check_factory(weights, temperature, "logit_average")

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
    _check_factory(weights, temperature, "prob_average")

    def combine(logits, state):
        logp, info = combine_prob_average(logits, weights, temperature)
        return logp, state, info

    return Combiner(lambda batch_size: EmptyState(), combine)
