r"""ADMM for the min-underestimation LP (:class:`~jaxens.solvers.instances.RatioProgram`).

With :math:`r_j = \min_i \hat p_{ij}` (:func:`jaxens.objectives.underestimation_bound`),

.. math::  \min_{p,s}\ s \quad\text{s.t.}\quad Q^\top p = \beta,\ 0 \le p_j \le s\,r_j,

i.e. minimise :math:`\max_{i,j} p_j/\hat p_{ij}`.  The splitting of :mod:`jaxens.solvers.splitting`
on :math:`(p, s)` (``s`` free in the x-update, which is the projection onto
:math:`Q^\top p = \beta`); the z-update is the prox of :math:`s + \iota\{0\le p\le s r\}`: for
fixed ``s``, :math:`p = \mathrm{clip}(a, 0, s r)`, and ``s`` is the root of the monotone
piecewise-linear :math:`\omega + \rho(s-b) - \rho\sum_j r_j(a_j - s r_j)_+` (:func:`ratio_prox_s`,
one sort over the breakpoints :math:`a_j/r_j`).  ``s`` is internally rescaled by :math:`\kappa`
(``ADMM.ratio_scale``) so that ``s`` and ``p`` have comparable magnitude.  The active-set polish
is not applied here (:data:`jaxens.solvers.polish.POLISH_RATIO`).

**Certified gap.**  ``SOLVED`` needs the OSQP residuals within tolerance *and* the relative gap
:math:`(s(p) - \mathrm{LB})/s(p) \le` ``tol_rel`` (:func:`ratio_gap`), with :math:`s(p) = \max_j p_j/r_j`
of the returned ``p`` and :math:`\mathrm{LB}` the larger Lagrangian bound :func:`ratio_lower_bound`
of two multipliers: the dual of the basis at ``p``'s active set (:func:`ratio_basis_dual`; exact
when ADMM has found the optimal vertex) and ADMM's dual :math:`y = Q^\top u_p` (the scaled dual
of the copy constraint on the ``p`` block:
at a fixed point :math:`\rho u_p \in \partial_p(\iota\{0\le p\le sr\}) \cap (-\mathrm{range}\,Q)`
up to sign, so :math:`\rho u_p = Qy` for the LP dual ``y``).  A row at the iteration cap whose
gap is certified and whose :math:`\lVert Q^\top p - \beta\rVert_\infty \le \epsilon_{abs} +
\epsilon_{rel}\lVert p\rVert_\infty` is ``SOLVED`` as well.  Otherwise the status is ``MAX_ITERS``;
``Solution.gap`` holds the certified relative gap either way.

Gradients: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` differentiates the basic solution
at the returned active set (:func:`ratio_basis`; tokens within relative ``sqrt(eps)`` of the
bound :math:`p_j = s r_j` count as at the bound); :class:`~jaxens.solvers.adjoint.UnrolledAdjoint`
reverse mode through ``steps`` further ADMM iterations from the converged state.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxens.problem import BottleneckProblem
from jaxens.solvers.adjoint import UnrolledAdjoint
from jaxens.solvers.base import iterate
from jaxens.solvers.polish import POLISH_RATIO, polish_ratio
from jaxens.solvers.projections import uniform_on
from jaxens.solvers.solution import Status
from jaxens.solvers.splitting import (
    SplittingOps,
    finish,
    initial_state,
    normalise,
    straight_through,
    unrolled_tail,
    warm_state,
)
from jaxens.solvers.support_adjoint import basis_solution

__all__ = [
    "ratio_row", "ratio_prox_s", "ratio_basis", "ratio_basis_dual", "ratio_value", "ratio_lower_bound", "ratio_gap", "solve_ratio",
]

UNROLL_STEPS = 2000  # UnrolledAdjoint(steps=None)


def ratio_prox_s(
    a: Float[Array, " v"], b: Float[Array, ""], r: Float[Array, " v"], rho, omega
) -> Float[Array, ""]:
    r"""``s`` part of :math:`\arg\min_{s\ge0,\ 0\le p\le s r}\ \omega s + \tfrac\rho2(\lVert p-a\rVert^2+(s-b)^2)`.

    :math:`\phi'(s) = \omega + \rho(s-b) - \rho\sum_j r_j (a_j - s r_j)_+` is increasing; with
    breakpoints :math:`t_j = a_j / r_j` sorted decreasingly, the active set on
    :math:`[t_{(K+1)}, t_{(K)}]` is the first ``K`` and the root is linear there.
    """
    dtype = a.dtype
    pos = r > 0
    t = jnp.where(pos, a / jnp.where(pos, r, 1.0), -1.0)  # r_j = 0: contributes nothing
    order = jnp.argsort(-t)
    ts, rs, as_ = t[order], r[order], a[order]
    cra = jnp.cumsum(rs * as_)
    crr = jnp.cumsum(rs * rs)
    # phi'(t_(k)) with the first k active (the k-th contributes 0 at its own breakpoint)
    dphi = omega + rho * (ts - b) - rho * (cra - ts * crr)
    K = jnp.sum(dphi > 0)  # root lies below the first K breakpoints
    sra = jnp.where(K > 0, cra[jnp.maximum(K - 1, 0)], 0.0)
    srr = jnp.where(K > 0, crr[jnp.maximum(K - 1, 0)], 0.0)
    s = (rho * b + rho * sra - omega) / (rho * (1.0 + srr))
    hi = jnp.where(K > 0, ts[jnp.maximum(K - 1, 0)], jnp.inf)
    lo = jnp.where(K < ts.shape[0], ts[jnp.minimum(K, ts.shape[0] - 1)], -jnp.inf)
    s = jnp.clip(s, lo, hi)
    return jnp.maximum(s, 0.0).astype(dtype)



def ratio_lower_bound(
    Q: Float[Array, "v r"], beta: Float[Array, " r"], r: Float[Array, " v"], y: Float[Array, " r"]
) -> Float[Array, ""]:
    r"""A certified lower bound on :math:`s^\star = \min\{s : Q^\top p = \beta,\ 0 \le p_j \le s r_j\}`
    from any multiplier ``y`` of the equality constraints.

    For every feasible :math:`(p, s)` and every ``y`` (weak duality),

    .. math::

        s = s + y^\top(\beta - Q^\top p)
          \ \ge\ \beta^\top y + \min_{s\ge0,\ 0\le p\le s r}\big(s - p^\top Q y\big)
          = \beta^\top y + \min_{s\ge0}\ s\Big(1 - \sum_j r_j (Qy)_j^+\Big),

    because for fixed ``s`` the inner minimum over the box :math:`[0, s r]` puts :math:`p_j = s r_j`
    where :math:`(Qy)_j > 0` and :math:`p_j = 0` elsewhere.  With :math:`c(y) = \sum_j r_j (Qy)_j^+`
    the minimum over ``s`` is 0 if :math:`c(y) \le 1` and :math:`-\infty` otherwise, so
    :math:`\mathrm{LB}(y) = \beta^\top y` on :math:`\{c(y) \le 1\}`.  Both :math:`\beta^\top y` and
    :math:`c` are positively homogeneous, so the best multiple of a direction ``y`` (scaled down,
    or up, to :math:`c = 1`) gives

    .. math::  \mathrm{LB}(y) = \max\Big(\frac{\beta^\top y}{c(y)},\ \frac{1}{\sum_j r_j}\Big)
               \quad(\beta^\top y > 0,\ c(y) > 0),

    the second term being the bound of the direction :math:`Qy = \mathbf 1` (:math:`\mathbf 1^\top p = 1`
    is one of the constraints: :math:`1 = \sum_j p_j \le s\sum_j r_j`).  ``r`` must be 0 where
    ``p`` must be 0 (off the mask).  A direction with :math:`c(y) = 0 < \beta^\top y` is a Farkas
    ray (the constraints are infeasible); it is not used here (the bound stays finite).
    The bound is exact up to the rounding of :math:`Qy` (relative ``~ v eps``).
    """
    dtype = Q.dtype
    g = Q @ y
    c = jnp.sum(r * jnp.maximum(g, 0.0))
    by = beta @ y
    tiny = jnp.finfo(dtype).tiny
    ray = jnp.where((by > 0) & (c > tiny), by / jnp.where(c > tiny, c, 1.0), 0.0)
    tot = jnp.sum(r)
    floor = jnp.where(tot > 0, 1.0 / jnp.where(tot > 0, tot, 1.0), 0.0)
    return jnp.maximum(ray, floor).astype(dtype)


def ratio_gap(primal: Float[Array, ""], lower: Float[Array, ""]) -> Float[Array, ""]:
    r"""The certified relative gap :math:`(s - \mathrm{LB}) / s` (``inf`` when ``s`` is not finite).

    Relative to ``s`` itself, not to :math:`\max(1, |s|)`: the objective's scale is that of ``r``
    (:func:`jaxens.objectives.underestimation_bound` scales it to ``max r = 1``, so ``s`` is often
    ``1e-2``), and the minimiser does not depend on it; ``s >= 1 / sum(r) > 0`` on any feasible row.
    """
    ok = jnp.isfinite(primal) & (primal > 0)
    gap = (primal - lower) / jnp.where(ok, primal, 1.0)
    return jnp.where(ok, gap, jnp.inf)


def _ratio_ops(problem: BottleneckProblem, r, m, omega):
    v = problem.vocab_size
    Q = problem.Q
    xb = Q @ problem.beta(m)

    def x_update(z, u, rho, x_prev):
        w = z - u
        wp = w[:v]
        return jnp.concatenate([xb + wp - Q @ (Q.T @ wp), w[v:]])

    def z_update(w, rho):
        a, b = w[:v], w[v]
        s = ratio_prox_s(a, b, r, rho, omega)
        return jnp.concatenate([jnp.clip(a, 0.0, s * r), s[None]])

    return x_update, z_update



def ratio_basis(problem: BottleneckProblem, p, r, m, mask, tie_rtol: float | None = None):
    r"""The basic solution of the min-underestimation LP at the active set of ``p`` (differentiable).

    With :math:`s = \max_j p_j/r_j`, the tokens at the bound :math:`U = \{p_j \ge s r_j(1-\delta)\}`
    and the free ones :math:`F = \{p_j > 0\}\setminus U`, the vertex solves
    :math:`Q_F^\top x_F + s\,Q_U^\top r_U = \beta(m)` in the unknowns :math:`(x_F, s)`
    (square and non-singular at a non-degenerate vertex, :math:`|F| + 1 = r`); it is computed as
    the minimum-norm solution :func:`~jaxens.solvers.support_adjoint.basis_solution` and
    :math:`p = x_F + s\,r_U`.  ``delta`` (``tie_rtol``) is ``sqrt(eps)`` of the dtype.
    """
    dtype = p.dtype
    delta = float(np.sqrt(np.finfo(dtype).eps)) if tie_rtol is None else tie_rtol
    pn, rn = jax.lax.stop_gradient((p, r))
    pos = mask & (pn > 0) & (rn > 0)
    t = jnp.where(pos, pn / jnp.where(pos, rn, 1.0), 0.0)
    s = jnp.max(t)
    at = pos & (t >= s * (1.0 - delta))
    fr = (mask & (pn > 0) & ~at).astype(dtype)
    ur = jnp.where(at, r, 0.0)
    Q = problem.Q
    B = jnp.concatenate([(Q * fr[:, None]).T, (ur @ Q)[:, None]], axis=1)
    xs = basis_solution(B, problem.beta(m))
    return fr * xs[:-1] + xs[-1] * ur



def ratio_basis_dual(Q, p, r, mask, tie_rtol: float | None = None) -> Float[Array, " r"]:
    r"""The dual of the basis at the active set of ``p`` (as in :func:`ratio_basis`): the minimum-norm
    ``y`` with :math:`B^\top y = e_{\text{last}}`, i.e. :math:`(Qy)_F = 0` on the free tokens and
    :math:`\sum_{j\in U} r_j (Qy)_j = 1`, :math:`y = (BB^\top)^+ Q^\top r_U` (one ``v r^2`` product).
    At the optimal basis :func:`ratio_lower_bound` of this ``y`` is the optimum; at any other it is
    still a valid bound.  Not differentiated."""
    dtype = p.dtype
    delta = float(np.sqrt(np.finfo(dtype).eps)) if tie_rtol is None else tie_rtol
    pos = mask & (p > 0) & (r > 0)
    t = jnp.where(pos, p / jnp.where(pos, r, 1.0), 0.0)
    s = jnp.max(t)
    at = pos & (t >= s * (1.0 - delta))
    fr = (mask & (p > 0) & ~at).astype(dtype)
    qu = Q.T @ jnp.where(at, r, 0.0)
    G = (Q * fr[:, None]).T @ Q + jnp.outer(qu, qu)
    return jnp.linalg.pinv(G, hermitian=True, rtol=float(np.finfo(dtype).eps) * Q.shape[1]) @ qu


def ratio_row(problem: BottleneckProblem, r, mask, m):
    """One row of a RatioProgram, checked (shapes, at trace time) and sanitised:
    ``(finite_in, r, mask, m)`` with ``r >= 0`` (0 off the mask or where not finite) and
    non-finite moments zeroed (``finite_in`` says whether the inputs were finite)."""
    dtype = problem.A.dtype
    v, D = problem.A.shape
    r = jnp.asarray(r, dtype)
    m = jnp.asarray(m, dtype)
    mask = jnp.asarray(mask, bool)
    if r.shape != (v,) or mask.shape != (v,) or m.shape != (D,):
        raise ValueError(
            f"RatioProgram expects r ({v},), mask ({v},), m ({D},) for one row; got "
            f"{r.shape}, {mask.shape}, {m.shape}"
        )
    finite_in = jnp.all(jnp.isfinite(jnp.where(mask, r, 0.0))) & jnp.all(jnp.isfinite(m))
    r = jnp.where(mask & jnp.isfinite(r), jnp.maximum(r, 0.0), 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return finite_in, r, mask, m


@functools.partial(jax.jit, static_argnames=("solver",))
def solve_ratio(solver: Any, problem: BottleneckProblem, r, mask, m, warm):
    """The min-underestimation LP for one row (``solver``: the ADMM settings)."""
    dtype = problem.A.dtype
    v, D = problem.A.shape
    finite_in, r, mask, m = ratio_row(problem, r, mask, m)
    r_live, m_live = r, m
    problem_ng, r, m = jax.lax.stop_gradient((problem, r, m))
    r0 = r
    if solver.ratio_scale is None:  # see the ratio_scale doc
        kappa = 0.01 * jnp.maximum(jnp.sum(r), jnp.finfo(dtype).tiny) / jnp.maximum(jnp.sum(mask), 1)
    else:
        kappa = jnp.asarray(solver.ratio_scale, dtype)
    r = r / kappa  # p <= (s kappa) (r / kappa)
    omega = 1.0 / kappa  # objective s = sigma / kappa
    Q = problem_ng.Q
    beta = problem_ng.beta(m)
    x_update, z_update = _ratio_ops(problem_ng, r, m, omega)

    def grad_norm(x):
        return jnp.asarray(omega, dtype)

    p_init = uniform_on(mask, dtype)
    s_init = jnp.max(p_init / jnp.where(r > 0, r, jnp.inf))
    s_init = jnp.where(jnp.isfinite(s_init), s_init, 1.0)
    default = jnp.concatenate([p_init, s_init[None]])
    x, z, u, rho0 = warm_state(warm, dtype, default)
    x, z, u = jax.lax.stop_gradient((x, z, u))
    rho0 = jnp.asarray(solver.rho0, dtype) if rho0 is None else jax.lax.stop_gradient(rho0)
    ops = SplittingOps(x_update, z_update, grad_norm, jnp.zeros((), dtype))
    state, _, loop_status = iterate(solver, ops, initial_state(x, z, u, rho0), solver.iteration_cap(dtype))
    polished = None
    if solver.polish and POLISH_RATIO:
        polished = polish_ratio(solver, Q, beta, r * kappa, kappa, mask, state)
    sol, state = finish(
        problem_ng, state, loop_status, mask, m, finite_in, state.z[:v], dtype, solver.polish_iters, Q, beta, polished
    )
    # the certified gap: SOLVED needs it within tol_rel (see the module doc)
    lower = jnp.maximum(
        ratio_lower_bound(Q, beta, r0, Q.T @ state.u[:v]),
        ratio_lower_bound(Q, beta, r0, ratio_basis_dual(Q, jax.lax.stop_gradient(sol.p), r0, mask)),
    )
    gap = ratio_gap(ratio_value(sol.p, r0), lower)
    tol_abs, tol_rel = solver.tolerances(dtype)
    certified = gap <= tol_rel
    # at the cap, a certified p whose own residual meets the primal tolerance is solved too
    q_res = jnp.max(jnp.abs(Q.T @ sol.p - beta))
    feasible = q_res <= tol_abs + tol_rel * jnp.max(sol.p)
    at_cap = (sol.status == Status.MAX_ITERS) & certified & feasible
    status = jnp.where((sol.status == Status.SOLVED) & ~certified, Status.MAX_ITERS, sol.status)
    status = jnp.where(at_cap, Status.SOLVED, status)
    sol = sol._replace(status=status.astype(jnp.int32), gap=jnp.where(finite_in, gap, jnp.inf).astype(dtype))
    p = sol.p
    if isinstance(solver.adjoint, UnrolledAdjoint):
        xu, zu = _ratio_ops(problem, r_live / kappa, m_live, omega)
        zt = unrolled_tail(solver, xu, zu, state, solver.adjoint.num_steps(UNROLL_STEPS))
        p_d = straight_through(p, normalise(zt[:v], mask))
    else:
        p_d = straight_through(p, ratio_basis(problem, p, r_live, m_live, mask))
    sol = sol._replace(p=jnp.where(finite_in, p_d, p))
    return sol, jax.lax.stop_gradient(state)


def ratio_value(p: Float[Array, "*B v"], r: Float[Array, "*B v"]) -> Float[Array, "*B"]:
    """The min-underestimation objective ``max_j p_j / r_j`` of a distribution ``p`` (``inf``
    where ``p_j > 0 = r_j``)."""
    return jnp.max(jnp.where(p > 0, p / jnp.where(r > 0, r, 1.0), 0.0) + jnp.where((p > 0) & (r <= 0), jnp.inf, 0.0), axis=-1)
