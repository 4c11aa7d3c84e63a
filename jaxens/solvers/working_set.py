r"""Working-set interior point (column generation) for the bottleneck LP / QP at full vocabulary.

**Problem** (one row, :class:`~jaxens.solvers.instances.LinearProgram` or
:class:`~jaxens.solvers.instances.QuadraticProgram` without caps):

.. math::  \min_p\ f(p) = \tfrac12\lVert U^\top p\rVert^2 + g_0^\top p
           \quad\text{s.t.}\quad Q^\top p = \beta,\ \ p \ge 0,\ \ p_j = 0 \text{ off the mask},

with ``U`` (``v x k``) the objective's and the soft members' factor and ``Q`` (``v x r``) the
orthonormal basis of :math:`\mathrm{span}[A_H, \mathbf 1]` (:mod:`jaxens.solvers.qp_terms`).
An optimal vertex of the LP has at most ``r`` positive tokens (a QP optimum at most
``r + k``): almost all of the vocabulary sits at its bound.

**Method.**  Keep a working set :math:`S` of ``K`` tokens (a few times ``r + k``) and repeat:

1. solve the *restricted* problem on :math:`S` (tokens outside at 0) with the dense
   interior-point method of :mod:`jaxens.solvers.ipm` (``K r^2`` per iteration, instead of the
   ``v r^2`` of an interior point on the full vocabulary), elastic so that it is always
   feasible; for an LP, a *crossover* to the basic solution of the ``r`` largest tokens
   (:math:`Q_B^\top p_B = \beta`, :math:`Q_B y = g_B`) makes the vertex exact at the working
   precision;
2. *price* every token with the restricted duals :math:`y` (one pass over ``Q``):
   :math:`d = \nabla f(p) - Qy`;
3. keep the ``K - a`` tokens of :math:`S` with the largest :math:`p_j` and bring in the ``a``
   tokens of most negative :math:`d_j`.

**Certificate.**  For any feasible :math:`p'` (:math:`\mathbf 1 \in \mathrm{span}\,Q`, so
:math:`\sum_j p'_j = 1`), convexity gives
:math:`f(p') \ge f(p) - \nabla f^\top p + \beta^\top y + \min_j d_j`, so

.. math::  \mathrm{gap} = \frac{\nabla f(p)^\top p - \beta^\top y - \min(0, \min_{j} d_j)}{1 + |f(p)|}

bounds the relative suboptimality of :math:`p` on the *full* vocabulary (rigorous up to
rounding).  ``SOLVED`` means ``gap <= tol`` and :math:`\lVert A_H^\top p - m_H\rVert_\infty
\le` ``tol_residual`` :math:`\cdot\max(1, \lVert m_H\rVert_\infty)`; otherwise ``MAX_ITERS``
(rounds exhausted, or an infeasible row: the restricted problem keeps an elastic residual —
decide feasibility with :func:`jaxens.solvers.least_squares.least_squares`).

**Warm start** (decode loops): the previous working set (``K`` token ids): the next step's
optimum shares most of its support.  **Gradients**: the implicit adjoint on the returned support
(:mod:`jaxens.solvers.support_adjoint`, as for :class:`~jaxens.solvers.admm.ADMM`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, check_adjoint
from jaxens.solvers.base import AbstractSolver
from jaxens.solvers.fista import check_row, sanitize_row
from jaxens.solvers.instances import LinearProgram, QuadraticProgram
from jaxens.solvers.ipm import dense_qp_ipm
from jaxens.solvers.projections import uniform_on
from jaxens.solvers.qp_terms import qp_attach, qp_factor, qp_grad
from jaxens.solvers.solution import Solution, Status

__all__ = ["WorkingSet"]


@dataclasses.dataclass(frozen=True)
class WorkingSet(AbstractSolver):
    """Working-set interior point with full-vocabulary pricing (see the module docstring).

    Example::

        sol, ws = WorkingSet().solve(problem, LinearProgram(c, mask, m), None)
        sol.gap          # certified relative suboptimality on the whole vocabulary

    Attributes:
      size: ``K``, the working-set size (``None``: ``2 (r + k)`` rounded up to a multiple of 64,
        at most ``v``).
      add: tokens brought in per round (``None``: ``K // 2``).
      max_rounds: the most restricted solves.
      tol: relative gap for ``SOLVED`` (``None``: ``5e-5`` in float32, ``1e-9`` in float64).
      tol_residual: ``||A_H^T p - m_H||_inf <= tol_residual * max(1, ||m_H||_inf)`` for ``SOLVED``
        (``None``: ``1e-5`` in float32, ``1e-9`` in float64).
      ipm_max_iters: the inner interior point's iteration cap per round.
      crossover: LPs: replace the interior point's answer by the basic solution of its ``r``
        largest tokens when that is non-negative.
      adjoint: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (the KKT system on the support).
    """

    size: int | None = None
    add: int | None = None
    max_rounds: int = 20
    tol: float | None = None
    tol_residual: float | None = None
    ipm_max_iters: int = 60
    crossover: bool = True
    adjoint: AbstractAdjoint = ImplicitAdjoint()

    accepts: ClassVar[tuple[type, ...]] = (LinearProgram, QuadraticProgram)

    def __post_init__(self):
        check_adjoint(self.adjoint)
        if not isinstance(self.adjoint, ImplicitAdjoint):
            raise TypeError("WorkingSet supports ImplicitAdjoint() only (the KKT system on the support)")
        if self.size is not None and self.size < 2:
            raise ValueError(f"Expected size >= 2 (or None), got {self.size}")
        if self.max_rounds < 1 or self.ipm_max_iters < 1:
            raise ValueError(f"Expected max_rounds, ipm_max_iters >= 1, got {self.max_rounds}, {self.ipm_max_iters}")

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(tol, tol_residual)`` for the working ``dtype`` (explicit values win)."""
        wide = jnp.finfo(dtype).bits >= 64
        tol = self.tol if self.tol is not None else (1e-9 if wide else 5e-5)
        tr = self.tol_residual if self.tol_residual is not None else (1e-9 if wide else 1e-5)
        return tol, tr

    def set_size(self, v: int, r: int, k: int) -> tuple[int, int]:
        """``(K, a)``: the working-set size and the tokens added per round (static)."""
        K = self.size if self.size is not None else -(-2 * (r + k) // 64) * 64
        K = max(min(K, v), min(v, r + 1))
        a = self.add if self.add is not None else K // 2
        return K, max(1, min(a, K - 1))

    def cold_start(self, problem: BottleneckProblem, dtype=None) -> Int[Array, " K"]:
        """No warm start in a decode loop's carry shape: ``-1`` ids (the first call chooses)."""
        K, _ = self.set_size(problem.vocab_size, problem.rank, _factor_bound(problem))
        return jnp.full((K,), -1, jnp.int32)

    def solve(
        self,
        problem: BottleneckProblem,
        instance: LinearProgram | QuadraticProgram,
        warm: Int[Array, " K"] | None = None,
    ) -> tuple[Solution, Int[Array, " K"]]:
        """Solve one row (``vmap`` for a batch); returns ``(Solution, final working set)``."""
        self.check_instance(instance)
        dtype = problem.A.dtype
        if isinstance(instance, LinearProgram):
            c = jnp.asarray(instance.c)
            F = jnp.zeros((problem.vocab_size, 0), c.dtype)
            rho = jnp.zeros((problem.num_members,), dtype) if instance.rho is None else instance.rho
            mask, m = instance.mask, instance.m
        else:
            if instance.ub is not None:
                raise ValueError("WorkingSet does not take caps (ub); use ADMM() for a capped QP")
            c, F, mask, m, rho = instance.c, instance.F, instance.mask, instance.m, instance.rho
        return _solve(self, problem, c, F, mask, m, rho, warm)


class _Round(NamedTuple):
    """The rounds loop's carry: the working set, the last priced answer and its certificate."""

    S: Array
    p: Array
    gap: Array
    resid: Array
    rounds: Array
    iters: Array
    stop: Array
    penalty: Array


def _factor_bound(problem: BottleneckProblem) -> int:
    """An upper bound of the Hessian factor's columns (``n`` objective + the soft members'),
    which sizes the working set the same way for every objective."""
    return problem.num_members + sum(problem.member_cols[i] for i in problem.soft)


def _initial_set(g0, Q, mask, K: int):
    """``K`` distinct tokens: half of most negative reduced cost under the least-squares duals
    ``y = Q^T g0`` (the part of the gradient ``g0`` off the span), half of smallest ``g0``."""
    d0 = g0 - Q @ (Q.T @ g0)
    half = K // 2
    score = jnp.where(mask, -d0, -jnp.inf)
    _, first = jax.lax.top_k(score, half)
    taken = jnp.zeros(mask.shape, bool).at[first].set(True)
    _, second = jax.lax.top_k(jnp.where(mask & ~taken, -g0, -jnp.inf), K - half)
    return jnp.concatenate([first, second]).astype(jnp.int32)


def _crossover(E, x, g, beta, r: int):
    """Basic solution of the ``r`` largest ``x``: ``E_B x_B = beta``, ``E_B^T y = g_B``;
    ``(x, y, ok)`` with ``ok`` when it is finite and non-negative."""
    _, B = jax.lax.top_k(x, r)
    EB = E[:, B]
    lu = jax.scipy.linalg.lu_factor(EB)
    xB = jax.scipy.linalg.lu_solve(lu, beta)
    xB = xB + jax.scipy.linalg.lu_solve(lu, beta - EB @ xB)  # one refinement step
    y = jax.scipy.linalg.lu_solve(lu, g[B], trans=1)
    scale = jnp.max(jnp.abs(xB))
    ok = jnp.all(jnp.isfinite(xB)) & jnp.all(jnp.isfinite(y)) & (jnp.min(xB) >= -1e-6 * scale)
    return jnp.zeros_like(x).at[B].set(jnp.maximum(xB, 0.0)), y, ok


def _residual_correction(E, x, beta, steps: int = 2):
    r"""Scaled minimum-norm corrections of ``E x = beta`` that keep ``x``'s support and sign,
    :math:`x \leftarrow x + XE^\top(EXE^\top)^{-1}(\beta - Ex)` (``X = diag(x)``), each kept
    only if it lowers the residual (the interior point's float32 floor is ~1e-5)."""
    eye = jnp.eye(E.shape[0], dtype=E.dtype)

    def one(x, _):
        xp = jnp.maximum(x, 0.0)
        res = beta - E @ xp
        EX = E * xp[None, :]
        M = EX @ E.T
        M = M + 1e-7 * (1.0 + jnp.max(jnp.abs(jnp.diag(M)))) * eye
        y = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(M), res)
        xn = jnp.maximum(xp + EX.T @ y, 0.0)
        better = jnp.all(jnp.isfinite(xn)) & (jnp.max(jnp.abs(beta - E @ xn)) < jnp.max(jnp.abs(res)))
        return jnp.where(better, xn, xp), None

    x, _ = jax.lax.scan(one, x, None, length=steps)
    return x


@functools.partial(jax.jit, static_argnames=("solver",))
def _solve(solver: WorkingSet, problem: BottleneckProblem, c, F, mask, m, rho, warm):
    dtype = problem.A.dtype
    c, F, m = (jnp.asarray(a, dtype) for a in (c, F, m))
    mask = jnp.asarray(mask, bool)
    rho = jnp.asarray(rho, dtype)
    check_row(problem, c, F, mask, m, rho)
    finite_in, c, F, m, rho = sanitize_row(c, F, mask, m, rho)
    params = (problem, c, F, m, rho)
    prob, c0, F0, m0, rho0 = jax.lax.stop_gradient(params)
    p_ng = (prob, c0, F0, m0, rho0)
    v, r = prob.Q.shape
    U = qp_factor(p_ng)  # v x k
    k = U.shape[1]
    g0 = jnp.where(mask, qp_grad(jnp.zeros((v,), dtype), p_ng), 0.0)  # linear term (soft included)
    U = jnp.where(mask[:, None], U, 0.0)
    Q = prob.Q
    beta = prob.beta(m0)
    K, a = solver.set_size(v, r, _factor_bound(prob))
    tol, tol_res = solver.tolerances(dtype)
    mh_scale = jnp.maximum(1.0, jnp.max(jnp.abs(prob.hard_moments(m0)), initial=0.0))
    qs = 1.0 / jnp.max(jnp.abs(Q))  # row scaling of the restricted constraints (entries ~ 1)

    # the gradient at the uniform point scores the first set (for an LP it is the cost)
    u = uniform_on(mask, dtype)
    g_u = jnp.where(mask, g0 + (U @ (U.T @ u) if k else 0.0), 0.0)
    if warm is None:
        S0 = _initial_set(g_u, Q, mask, K)
    else:
        warm = jnp.asarray(warm, jnp.int32)
        if warm.shape != (K,):
            raise ValueError(f"WorkingSet warm start must be {K} token ids, got shape {warm.shape}")
        S0 = jnp.where(jnp.all(warm >= 0), warm, _initial_set(g_u, Q, mask, K))

    # the elastic penalty must exceed the duals: 10x a bound of the gradient on the simplex,
    # |g0_j + (U U^T p)_j| <= |g0_j| + max_l ||U_l||^2 (raised 10x whenever the elastic stays active)
    grad_bound = 1.0 + jnp.max(jnp.abs(g0)) + (jnp.max(jnp.sum(U * U, axis=1)) if k else 0.0)

    first_penalty = 10.0 * grad_bound

    def restricted(S, penalty):
        valid = mask[S]
        E = (Q[S] * qs).T  # r x K
        GS = U[S]
        cS = g0[S]
        res = dense_qp_ipm(E, GS, cS, beta * qs, valid, penalty, tol=0.1 * tol, max_iters=solver.ipm_max_iters)
        x, y = res.x, res.y
        if solver.crossover and not k:
            xc, yc, ok = _crossover(E, x, cS, beta * qs, r)
            x, y = jnp.where(ok, xc, x), jnp.where(ok, yc, y)
        x = _residual_correction(E, x, beta * qs)
        return x, y * qs, res.iterations, jnp.max(jnp.abs(res.t)) / qs

    def price(S, x, y):
        p = jnp.zeros((v,), dtype).at[S].add(x)
        Up = U.T @ p if k else jnp.zeros((0,), dtype)
        g = g0 + (U @ Up if k else 0.0)
        d = jnp.where(mask, g - Q @ y, jnp.inf)
        f = 0.5 * jnp.sum(Up**2) + g0 @ p
        gap = (g @ p - beta @ y - jnp.minimum(0.0, jnp.min(d))) / (1.0 + jnp.abs(f))
        resid = prob.hard_residual(p, m0)
        return p, d, gap, resid

    def body(carry: _Round) -> _Round:
        S, penalty = carry.S, carry.penalty
        x, y, it, elastic = restricted(S, penalty)
        p, d, gap, resid = price(S, x, y)
        done = (gap <= tol) & (resid <= tol_res * mh_scale)
        # next set: the K - a largest of S, then the a most negative reduced costs outside S
        _, keep = jax.lax.top_k(x, K - a)
        kept = S[keep]
        inside = jnp.zeros((v,), bool).at[kept].set(True)
        _, new = jax.lax.top_k(jnp.where(inside | ~mask, -jnp.inf, -d), a)
        S_next = jnp.where(done, S, jnp.concatenate([kept, new.astype(jnp.int32)]))
        # no token can improve: the restricted optimum is global (elastic off), or, with the
        # elastic on at 1e4 x the first penalty, the row is infeasible (to be certified by the
        # least-squares phase: status MAX_ITERS)
        priced_out = jnp.min(d) >= 0.0
        elastic_on = elastic > tol_res * mh_scale
        stuck = priced_out & (~elastic_on | (penalty >= 1e4 * first_penalty))
        penalty = jnp.where(elastic_on, 10.0 * penalty, penalty)
        return _Round(S_next, p, gap, resid, carry.rounds + 1, carry.iters + it,
                      done | stuck | ~jnp.isfinite(gap), penalty)

    inf = jnp.asarray(jnp.inf, dtype)
    zero = jnp.zeros((), jnp.int32)
    init = _Round(S0, jnp.zeros((v,), dtype), inf, inf, zero, zero, jnp.zeros((), bool), first_penalty)
    out = jax.lax.while_loop(lambda cr: ~cr.stop & (cr.rounds < solver.max_rounds), body, init)
    S, p, gap, resid, iters = out.S, out.p, out.gap, out.resid, out.iters
    p = jnp.where(mask, jnp.maximum(p, 0.0), 0.0)
    tot = jnp.sum(p)
    finite = jnp.isfinite(tot) & (tot > 0)
    p = jnp.where(finite, p / jnp.where(finite, tot, 1.0), uniform_on(mask, dtype))
    solved = (gap <= tol) & (resid <= tol_res * mh_scale)
    status = jnp.where(finite, jnp.where(solved, Status.SOLVED, Status.MAX_ITERS), Status.NUMERICAL_ERROR)
    status = jnp.where(finite_in, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    p = jnp.where(finite_in, p, uniform_on(mask, dtype))
    free = (mask & (p > 0)).astype(dtype)
    p_d = qp_attach(p, params, free, jnp.where(free > 0, 0.0, p))
    sol = Solution(
        p=jnp.where(finite_in, p_d, p),
        status=status,
        primal_residual=prob.hard_residual(p, m0),
        gap=jnp.where(finite_in, gap, jnp.inf).astype(dtype),
        iterations=iters,
        certificate=jnp.zeros((prob.A.shape[1],), dtype),
        certificate_margin=jnp.zeros((), dtype),
    )
    return sol, jax.lax.stop_gradient(S)
