r"""The feasible sets of the first-order solvers: projections, linear minimisation oracles.

Per row the simplex solvers work on

.. math::  \mathcal C = \{p \in \mathbb R^v : p \ge 0,\ \textstyle\sum_j p_j = 1,
           \ p_j = 0 \text{ where } \neg\mathrm{mask}_j,\ p \le u \text{ (optional caps)}\}.

* :func:`project_masked_simplex` / :func:`project_capped_simplex`: the Euclidean projection
  :math:`\Pi_{\mathcal C}(y) = \arg\min_{p\in\mathcal C}\lVert p - y\rVert_2^2` (without / with caps).
* :func:`min_linear` / :func:`max_linear`: the linear minimisation oracle's value
  :math:`\min_{s\in\mathcal C} g^\top s` and the support function :math:`\max_{s\in\mathcal C} g^\top s`.
* :func:`uniform_on`: the uniform distribution on the mask (the solvers' cold start and the
  fallback of rows with non-finite input).
* :func:`column_weights` / :func:`lipschitz`: the weights ``w`` of the quadratic penalty
  :math:`\tfrac12\sum_k w_k (A^\top p - m)_k^2` (``rho_i`` on soft members' columns, ``h`` on
  hard ones) and the Lipschitz constant of the gradient of ``FISTA``'s objective.

Jacobians.  On the support :math:`S = \{j : p_j > 0\}` of :math:`p = \Pi_{\Delta}(y)` (no caps)
the projection is :math:`p_S = y_S - \tau` with :math:`\tau = (\mathbf 1^\top y_S - 1)/|S|`, so

.. math::  \partial p / \partial y = \mathrm{diag}(s) - s s^\top / |S|, \qquad s = \mathbf 1_S,

(optax ``projection_simplex`` differentiates to exactly this); with caps the capped coordinates
leave the free set :math:`F = \{0 < p_j < u_j\}` and :math:`J = \mathrm{diag}(f) - ff^\top/|F|`
(an analytic ``custom_jvp``: autodiff through the bisection would not give it).
``tests/solvers/test_projections.py`` checks both against central finite differences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float
from optax.projections import projection_simplex

from jaxens.problem import BottleneckProblem

__all__ = [
    "project_masked_simplex",
    "project_capped_simplex",
    "project",
    "min_linear",
    "max_linear",
    "uniform_on",
    "column_weights",
    "lipschitz",
]


def project_masked_simplex(y: Float[Array, " v"], mask: Bool[Array, " v"]) -> Float[Array, " v"]:
    r"""Euclidean projection onto :math:`\{p \in \Delta_v : p_j = 0 \text{ off mask}\}`.

    :math:`p = \max(y - \tau, 0)` on the mask with :math:`\tau` such that :math:`\sum_j p_j = 1`
    (optax's sort-based ``projection_simplex``).  Masked entries are moved below
    ``max(y[mask]) - 1`` first: the threshold is at least ``max(y) - 1``, so they come out
    exactly zero.
    """
    top = jnp.max(jnp.where(mask, y, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(mask, projection_simplex(jnp.where(mask, y, top - 2.0)), 0.0)


def project_capped_simplex(
    y: Float[Array, " v"], ub: Float[Array, " v"], num_bisect: int | None = None
) -> Float[Array, " v"]:
    r"""Projection onto :math:`\{p : 0 \le p \le u,\ \sum_j p_j = 1\}` (``u = 0`` masks a token).

    :math:`p = \mathrm{clip}(y - \tau, 0, u)` with :math:`\tau` the root of the monotone
    :math:`\sum_j \mathrm{clip}(y_j-\tau,0,u_j) = 1`: bisection (``num_bisect`` halvings;
    ``None``: 64 in float64, 40 otherwise), then one exact solve on the free set.  If
    :math:`\sum_j u_j < 1` the set is empty and ``u`` (the nearest point of the box to the
    hyperplane) is returned; callers detect that case separately.

    Derivative (``custom_jvp``, exact away from the kinks): with the free set
    :math:`F = \{0 < p_j < u_j\}` and the capped set :math:`C = \{p_j = u_j > 0\}`,
    :math:`\dot\tau = (\mathbf 1_F^\top\dot y + \mathbf 1_C^\top\dot u)/|F|`,
    :math:`\dot p_F = \dot y_F - \dot\tau`, :math:`\dot p_C = \dot u_C`, 0 elsewhere; in ``y``
    alone :math:`J = \mathrm{diag}(f) - ff^\top/|F|`.
    """
    if num_bisect is None:
        num_bisect = 64 if y.dtype == jnp.float64 else 40
    return _capped(num_bisect, y, ub)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _capped(num_bisect: int, y, ub):
    lo = jnp.min(jnp.where(ub > 0, y - ub, jnp.inf)) - 1.0
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.max(y)

    def mass(tau):
        return jnp.sum(jnp.clip(y - tau, 0.0, ub))

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        big = mass(mid) > 1.0
        return jnp.where(big, mid, lo), jnp.where(big, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_bisect, body, (lo, hi))
    tau = 0.5 * (lo + hi)
    free = (y - tau > 0) & (y - tau < ub)
    nfree = jnp.sum(free)
    capped = jnp.sum(jnp.where((y - tau >= ub) & ~free, ub, 0.0))
    tau_exact = (jnp.sum(jnp.where(free, y, 0.0)) + capped - 1.0) / jnp.maximum(nfree, 1)
    tau = jnp.where((nfree > 0) & (tau_exact >= lo) & (tau_exact <= hi), tau_exact, tau)
    return jnp.clip(y - tau, 0.0, ub)


@_capped.defjvp
def _capped_jvp(num_bisect, primals, tangents):
    y, ub = primals
    dy, du = tangents
    p = _capped(num_bisect, y, ub)
    free = (p > 0) & (p < ub)
    cap = (p >= ub) & (ub > 0) & ~free
    nfree = jnp.sum(free)
    dtau = (jnp.sum(jnp.where(free, dy, 0.0)) + jnp.sum(jnp.where(cap, du, 0.0))) / jnp.maximum(nfree, 1)
    dp = jnp.where(free, dy - dtau, jnp.where(cap, du, 0.0))
    return p, dp.astype(p.dtype)


def project(
    y: Float[Array, " v"], mask: Bool[Array, " v"], ub: Float[Array, " v"] | None
) -> Float[Array, " v"]:
    r""":math:`\Pi_{\mathcal C}(y)`: :func:`project_masked_simplex` without caps, else
    :func:`project_capped_simplex` with ``u = 0`` off the mask."""
    if ub is None:
        return project_masked_simplex(y, mask).astype(y.dtype)
    return project_capped_simplex(y, jnp.where(mask, ub, 0.0)).astype(y.dtype)


def min_linear(
    g: Float[Array, " v"], mask: Bool[Array, " v"], ub: Float[Array, " v"] | None
) -> Float[Array, ""]:
    r""":math:`\min_{s \in \mathcal C} g^\top s` (the linear minimisation oracle's value).

    Simplex: :math:`\min_{j\in\mathrm{mask}} g_j`.  With caps ``u``: fill the cheapest
    coordinates up to their caps until the mass reaches one (a sort).
    """
    if ub is None:
        return jnp.min(jnp.where(mask, g, jnp.inf))
    u = jnp.where(mask, ub, 0.0)
    order = jnp.argsort(g)
    gs, us = g[order], u[order]
    before = jnp.cumsum(us) - us
    take = jnp.clip(1.0 - before, 0.0, us)
    return jnp.sum(jnp.where(take > 0, gs * take, 0.0))


def max_linear(
    g: Float[Array, " v"], mask: Bool[Array, " v"], ub: Float[Array, " v"] | None
) -> Float[Array, ""]:
    r"""Support function :math:`\sigma_{\mathcal C}(g) = \max_{s \in \mathcal C} g^\top s = -\min_{s\in\mathcal C}(-g)^\top s`."""
    return -min_linear(-g, mask, ub)


def uniform_on(mask: Bool[Array, " v"], dtype) -> Float[Array, " v"]:
    r""":math:`p_j = \mathbf 1[\mathrm{mask}_j] / \max(|\mathrm{mask}|, 1)`: uniform on the mask
    (all zeros when the mask is empty)."""
    cnt = jnp.maximum(jnp.sum(mask), 1)
    return jnp.where(mask, 1.0 / cnt, 0.0).astype(dtype)


def column_weights(
    problem: BottleneckProblem, rho: Float[Array, " n"], hard_weight: Float[Array, ""]
) -> Float[Array, " D"]:
    r"""Per-column weight ``w`` so that the penalty is :math:`\tfrac12\sum_k w_k (A^\top p - m)_k^2`:
    :math:`w_k = \rho_i` on the columns of soft member ``i``, ``hard_weight`` on hard columns."""
    n = problem.num_members
    col_member = np.repeat(np.arange(n), problem.member_cols)
    is_soft = np.isin(col_member, np.asarray(problem.soft, np.int64))
    is_hard = np.isin(col_member, np.asarray(problem.hard, np.int64))
    dtype = problem.A.dtype
    w = jnp.where(jnp.asarray(is_soft), jnp.asarray(rho, dtype)[col_member], 0.0)
    return w + jnp.where(jnp.asarray(is_hard), jnp.asarray(hard_weight, dtype), 0.0)


def lipschitz(
    problem: BottleneckProblem,
    F: Float[Array, "v k"],
    rho: Float[Array, " n"],
    hard_weight: Float[Array, ""],
) -> Float[Array, ""]:
    r""":math:`L = \lVert F\rVert_F^2 + \sum_{i\in S}\rho_i\lambda_{\max}(A_i^\top A_i) + h\,\lambda_{\max}(A_H^\top A_H)`,
    an upper bound on the Lipschitz constant of :math:`\nabla f` (the problem's cached eigenvalues)."""
    soft = np.asarray(problem.soft, np.int64)
    L = jnp.sum(F * F) + hard_weight * problem.lipschitz_hard
    if soft.size:
        L = L + jnp.sum(jnp.asarray(rho)[soft] * problem.lipschitz_members[soft])
    return L
