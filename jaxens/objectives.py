r"""The objectives that choose one distribution from the bottleneck feasible set.

Notation (per batch row): members :math:`i = 1..n` with log-probabilities
:math:`\ell_i = \log \hat p_i \in [-\infty, 0]^v`, weights :math:`w_i \ge 0` normalised to
:math:`\sum_i w_i = 1`, feasible set

.. math::  \mathcal F = \{p \in \Delta_v : A_i^\top p = A_i^\top \hat p_i\ \forall i \in H\}

(:mod:`jaxens.problem`), soft members :math:`S` adding
:math:`\sum_{i\in S} \frac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2` to any objective.

======================  ==============================================================  =========================
name                    problem (instance, :func:`instance`)                            solver (default)
======================  ==============================================================  =========================
``sum_ce``              LP  :math:`\min_{p\in\mathcal F} -\sum_i w_i\, p\cdot\ell_i`    ADMM
``sum_sq_ce``           QP  :math:`\min_{p\in\mathcal F} \sum_i w_i (p\cdot\ell_i)^2`   ADMM
``least_squares``       :math:`\min_{p\in\Delta_v} \lVert A_H^\top p - m_H\rVert_2^2`   LeastSquares (FISTA)
``kl``                  :math:`\min_{p\in\mathcal F} \sum_i w_i\,\mathrm{KL}(p\Vert\hat p_i)`      EntropicNewton (dual)
``max_entropy``         :math:`\min_{p\in\mathcal F} \sum_j p_j\log p_j`                EntropicNewton (dual)
``min_underestimation`` LP  :math:`\min_{p\in\mathcal F}\max_{i,j} p_j/\hat p_{ij}`     ADMM (ratio prox)
``cross_entropy``       :math:`\min_{p\in\mathcal F} \sum_i w_i H(\hat p_i, p)`         CrossEntropyNewton (dual)
======================  ==============================================================  =========================

The instances are :class:`~jaxens.solvers.instances.LinearProgram`, ``QuadraticProgram``,
``LeastSquaresProgram``, ``EntropicProgram`` (twice), ``RatioProgram`` and
``MixtureCrossEntropy``; the defaults are :func:`jaxens.solvers.defaults.default_solver`.

Details and conventions:

* ``sum_ce`` (the blog's LP).  The cost vector is :math:`c = -\sum_i w_i \ell_i`.  An LP has a
  face of optima in general; the default ADMM solver returns an optimum that depends on its
  start; ``EntropicNewton`` follows the entropic path :math:`\min c\cdot p - \varepsilon H(p)`
  down to a small :math:`\varepsilon`, whose limit is the *maximum-entropy point of the optimal
  face* (Cominetti & San Martín, 1994).  Without constraints the optimum is the
  one-hot vector at :math:`\arg\min_j c_j` (the blog's remark).
* ``sum_sq_ce`` (the blog's QP): :math:`\sum_i w_i (p\cdot\ell_i)^2 = \tfrac12\lVert F^\top p\rVert^2`
  with :math:`F = [\sqrt{2w_1}\,\ell_1, \dots, \sqrt{2w_n}\,\ell_n]` (rank :math:`\le n`): no
  single member's cross-entropy is allowed to be large.
* ``least_squares``: the relaxation used when :math:`\mathcal F = \emptyset` (e.g. :math:`n d > v`,
  or members whose moments no distribution shares).  Its residual :math:`r = m_H - A_H^\top p^\star`
  yields the Farkas certificate :math:`d = r/\lVert r\rVert` with
  :math:`d^\top m_H - \max_k (A_H d)_k = \lVert r\rVert > 0` (minimax duality), reported in
  :class:`~jaxens.solvers.solution.Solution`.
* ``kl`` (entropic): :math:`\sum_i w_i \mathrm{KL}(p\Vert\hat p_i) = \mathrm{KL}(p\Vert q) + \text{const}`
  with :math:`q = \mathrm{softmax}(\sum_i w_i \ell_i)`, the logit average; the solution is
  :math:`p = \mathrm{softmax}(\sum_i w_i\ell_i + A_H z)` for the minimiser :math:`z` of the convex
  dual :math:`\mathrm{logsumexp}(\sum_i w_i\ell_i + A_H z) - z^\top m_H`.  Logit averaging is the
  point :math:`z = 0`; the bottleneck correction is low rank, in the members' own embedding
  directions.
* ``max_entropy``: the same with a uniform prior, :math:`p = \mathrm{softmax}(A_H z)`.
* ``min_underestimation`` (the blog's "minimum under-estimation of token log-probabilities").
  Member :math:`i` under-estimates token :math:`j` by :math:`\log p_j - \log\hat p_{ij}` nats
  when that is positive.  The objective minimises the *largest* such under-estimation over
  members and tokens, :math:`\min_{p\in\mathcal F}\max_{i,j}(\log p_j - \log \hat p_{ij})`, which,
  :math:`\exp` being monotone, is the LP :math:`\min s` s.t. :math:`p\in\mathcal F`,
  :math:`0 \le p_j \le s\, r_j`, :math:`r_j = \min_i \hat p_{ij}` (computed in log space and scaled
  to :math:`\max_j r_j = 1`, which leaves the minimiser unchanged; see
  :func:`underestimation_bound` for rows whose members have disjoint supports).
* ``cross_entropy`` (the blog's "true distribution's cross-entropy with the predicted
  distributions"): :math:`\sum_i w_i H(\hat p_i, p) = -\sum_j s_j \log p_j` with
  :math:`s = \sum_i w_i \hat p_i`.  Without constraints its minimiser is probability averaging,
  :math:`p = s`; with them, :math:`p_j = s_j / (A_H y + \mu)_j` for the dual optimum.

Masked tokens.  A token with :math:`\ell_{ij} = -\infty` for *every* member gets :math:`p_j = 0`
under every objective.  A token ruled out by *some* member gets :math:`p_j = 0` under the
objectives that would otherwise be infinite (``sum_ce``, ``sum_sq_ce``, ``kl``,
``min_underestimation``); ``least_squares``, ``max_entropy`` and ``cross_entropy`` only drop the
tokens every member rules out.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxens.solvers.instances import (
    EntropicProgram,
    LeastSquaresProgram,
    LinearProgram,
    MixtureCrossEntropy,
    QuadraticProgram,
    RatioProgram,
)

OBJECTIVES = (
    "sum_ce",
    "sum_sq_ce",
    "least_squares",
    "kl",
    "max_entropy",
    "min_underestimation",
    "cross_entropy",
)

# Objectives whose value is infinite when p puts mass where some member has p_hat = 0.
STRICT_MASK = frozenset({"sum_ce", "sum_sq_ce", "kl", "min_underestimation"})


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown bottleneck objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return name


def unusable_rows(logits: Float[Array, "*B v"]) -> Bool[Array, "*B"]:
    """The one rule for a member row no combiner can use: NaN or ``+inf`` on some token, or ``-inf``
    on every token (``log_softmax`` would be NaN).  Such a row gets status ``NONFINITE_INPUT``.

    Example::

        unusable_rows(jnp.array([[0.0, 1.0], [-jnp.inf, -jnp.inf]]))   # [False, True]
    """
    return jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1) | jnp.all(logits == -jnp.inf, axis=-1)


class RowData(NamedTuple):
    """Per-row canonical data shared by the objectives (no leading batch axis)."""

    logp: Float[Array, "n v"]  # member log-probabilities, -inf where masked, finite elsewhere
    mask: Bool[Array, " v"]  # tokens allowed for this objective
    nonfinite: Bool[Array, ""]  # NaN / +inf in the member logits, or a member with every token -inf
    weights: Float[Array, " n"]  # normalised, sum to one


def row_data(objective: str, logits: Float[Array, "n v"], weights: Float[Array, " n"]) -> RowData:
    """Member log-probs, the objective's token mask and a non-finite flag for one row."""
    bad = unusable_rows(logits)  # (n,)
    nonfinite = jnp.any(bad)
    logp = jax.nn.log_softmax(jnp.where(bad[:, None], 0.0, logits), axis=-1)
    ruled_out = logp == -jnp.inf
    if objective in STRICT_MASK:
        # members with zero weight do not veto tokens
        mask = ~over_members(jnp.logical_or, ruled_out & (weights[:, None] > 0))
    else:
        mask = ~over_members(jnp.logical_and, ruled_out)
    # a row in which the objective's mask removes everything: fall back to the loose mask
    mask = jnp.where(jnp.any(mask), mask, ~over_members(jnp.logical_and, ruled_out))
    w = weights / jnp.sum(weights)
    return RowData(logp, mask, nonfinite, w)


def over_members(op: Any, x: Array, axis: int = 0) -> Array:
    """Reduce the member axis (static size ``n``) with the binary ``op``, as ``n - 1``
    elementwise ops (XLA:CPU reduces a small non-minor axis of ``(B, n, v)`` much slower than it
    adds ``n`` vectors)."""
    return functools.reduce(op, [jnp.take(x, i, axis=axis) for i in range(x.shape[axis])])


def _finite(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def linear_cost(d: RowData) -> Float[Array, " v"]:
    """``sum_ce``: :math:`c = -\\sum_i w_i \\ell_i` (0 on masked tokens, which are pinned to 0)."""
    c = -over_members(jnp.add, jnp.where(d.weights[:, None] > 0, d.weights[:, None] * _finite(d.logp), 0.0))
    return jnp.where(d.mask, c, 0.0)


def quadratic_factor(d: RowData) -> Float[Array, "v n"]:
    """``sum_sq_ce``: :math:`F = [\\sqrt{2 w_i}\\,\\ell_i]_i` so that the objective is ``0.5||F^T p||^2``."""
    F = jnp.sqrt(2.0 * d.weights)[:, None] * jnp.where(d.mask[None, :], _finite(d.logp), 0.0)
    return F.T


def kl_prior(d: RowData) -> Float[Array, " v"]:
    """``kl``: the logit-average prior :math:`\\theta = \\sum_i w_i \\ell_i` (``-inf`` off the mask;
    members with :math:`w_i = 0` are ignored), so that
    :math:`\\mathrm{KL}(p\\Vert\\mathrm{softmax}\\,\\theta) = \\sum_i w_i\\mathrm{KL}(p\\Vert\\hat p_i) + \\text{const}`."""
    theta = -linear_cost(d)
    return jnp.where(d.mask, theta, -jnp.inf)


def uniform_prior(d: RowData) -> Float[Array, " v"]:
    """``max_entropy``: :math:`\\theta = 0` on the mask."""
    return jnp.where(d.mask, 0.0, -jnp.inf).astype(d.logp.dtype)


def mixture_weights(d: RowData) -> Float[Array, " v"]:
    """``cross_entropy``: :math:`s = \\sum_i w_i \\hat p_i` (probability average)."""
    return jnp.where(d.mask, over_members(jnp.add, d.weights[:, None] * jnp.exp(d.logp)), 0.0)


def underestimation_bound(d: RowData) -> Float[Array, " v"]:
    """``min_underestimation``: :math:`r_j \\propto \\min_{i: w_i>0} \\hat p_{ij}`, scaled to ``max r = 1``.

    The LP's minimiser does not change when ``r`` is scaled, and the scaling keeps ``r`` from
    underflowing to zero everywhere (near one-hot members that disagree).  When no allowed token
    has positive bound (members with disjoint supports: the mask fell back to the loose one and
    every distribution under-estimates some member infinitely), the minimum is taken over the
    members that allow the token.
    """
    use = d.weights[:, None] > 0
    u = over_members(jnp.minimum, jnp.where(use, d.logp, jnp.inf))  # log r_j, -inf where some member vetoes
    u_loose = over_members(jnp.minimum, jnp.where(use & (d.logp > -jnp.inf), d.logp, jnp.inf))
    u = jnp.where(jnp.any(d.mask & (u > -jnp.inf)), u, u_loose)
    u = jnp.where(d.mask & (u < jnp.inf), u, -jnp.inf)
    top = jnp.max(u)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(d.mask, jnp.exp(u - top), 0.0)


_INSTANCES = {
    "sum_ce": lambda d, m, rho: LinearProgram(linear_cost(d), d.mask, m, rho),
    "sum_sq_ce": lambda d, m, rho: QuadraticProgram(
        jnp.zeros(d.logp.shape[-1:], d.logp.dtype), quadratic_factor(d), d.mask, m, rho
    ),
    "least_squares": lambda d, m, rho: LeastSquaresProgram(d.mask, m),
    "kl": lambda d, m, rho: EntropicProgram(kl_prior(d), d.mask, m, rho),
    "max_entropy": lambda d, m, rho: EntropicProgram(uniform_prior(d), d.mask, m, rho),
    "min_underestimation": lambda d, m, rho: RatioProgram(underestimation_bound(d), d.mask, m),
    "cross_entropy": lambda d, m, rho: MixtureCrossEntropy(mixture_weights(d), d.mask, m, rho),
}


def instance(objective: str, d: RowData, m: Float[Array, " D"], rho: Float[Array, " n"]):
    """The typed problem instance of ``objective`` for one row (:mod:`jaxens.solvers.instances`):
    its data from :func:`row_data` ``d``, the members' moments ``m = A^T p_hat`` and the soft
    weights ``rho`` (see the table in the module docstring)."""
    return _INSTANCES[check_objective(objective)](d, m, rho)
