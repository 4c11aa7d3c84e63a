r"""Accelerated projected gradient (FISTA with adaptive restart) over the masked simplex.

Per row, FISTA solves

.. math::

    \min_{p \in \mathcal C}\ f(p) = \tfrac12\lVert F^\top p\rVert^2 + c^\top p
        + \sum_{i\in S}\tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2
        + \tfrac{h}{2}\lVert A_H^\top p - m_H\rVert^2,

    \mathcal C = \{p : p \ge 0,\ \textstyle\sum_j p_j = 1,\ p_j = 0 \text{ where } \neg\mathrm{mask}_j,
        \ p \le u\ \text{(optional caps)}\},

with ``F`` a per-row ``v x k`` factor (``k`` may be 0), ``c`` a per-row linear term, soft weights
:math:`\rho_i` for the members in ``problem.soft`` and a penalty weight :math:`h\ge0` on the hard
block (``h = 2`` gives the least-squares objective :math:`\lVert A_H^\top p - m_H\rVert^2`).

Iteration (Beck & Teboulle, "A fast iterative shrinkage-thresholding algorithm", SIAM J. Imaging
Sci. 2009; gradient-scheme adaptive restart of O'Donoghue & Candes, "Adaptive restart for
accelerated gradient schemes", FoCM 2015):

.. math::

    x_{k+1} = \Pi_{\mathcal C}(y_k - \nabla f(y_k)/L),\quad
    t_{k+1} = \tfrac{1+\sqrt{1+4t_k^2}}{2},\quad
    y_{k+1} = x_{k+1} + \tfrac{t_k-1}{t_{k+1}}(x_{k+1}-x_k),

restarting (:math:`t=1`, :math:`y=x`) whenever :math:`(y_k-x_{k+1})^\top(x_{k+1}-x_k) > 0`.
:math:`L = \lVert F\rVert_F^2 + \sum_{i\in S}\rho_i\lambda_{\max}(A_i^\top A_i)
+ h\,\lambda_{\max}(A_H^\top A_H)` (the cached constants of the problem).  The gradient is affine in
``p``, so :math:`\nabla f(y_{k+1})` is the same combination of :math:`\nabla f(x_{k+1})` and
:math:`\nabla f(x_k)`: one pair of ``v x D`` mat-vecs per iteration.

Stopping: the Frank-Wolfe gap :math:`g(x) = \nabla f(x)^\top x - \min_{s\in\mathcal C}\nabla f(x)^\top s
\ge f(x) - f^\star` (for the plain simplex, :math:`\min_s = \min_{j\in\mathrm{mask}}\nabla f_j`)
falls below ``tol * (1 + |f(x)|)``.  It is returned as ``Solution.gap``.

Gradients (``adjoint``): the loop runs on stopped inputs.  ``"implicit"`` differentiates the
KKT conditions of the returned point on its support, :math:`p = P(p - \nabla f(p))` with
:math:`P` the projection onto the face's affine hull (:mod:`jaxens.solvers.fixed_point_adjoint`;
here :math:`E = \mathbf 1`, the Hessian factor is :math:`U = [F,\ \sqrt{w_j}A_j]` over the
weighted columns: one ``K x K`` eigendecomposition per backward pass).  ``"unrolled"`` runs
``unroll_steps`` FISTA iterations from the converged point and differentiates through them
(forward value unchanged).  Exact when the optimum is unique (the reduced Hessian is
non-singular on the support's tangent space), e.g. the least-squares phase of an infeasible row;
on a feasible row the least-squares optimum is a whole face and has no derivative.

The solver works on one row; ``jax.vmap`` it over a batch (one compile).  No per-row ``v x D``
matrix is formed: ``A`` is shared, the per-row data are vectors (and ``F``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int
from optax.projections import projection_simplex

from jaxens.problem import BottleneckProblem
from jaxens.solvers.fixed_point_adjoint import support_adjoint
from jaxens.solvers.solution import Solution, Status


# --------------------------------------------------------------------------------------------
# The feasible set C = simplex ∩ mask (∩ box): projection and linear minimisation oracle.
# --------------------------------------------------------------------------------------------
def project_masked_simplex(y: Float[Array, " v"], mask: Bool[Array, " v"]) -> Float[Array, " v"]:
    r"""Euclidean projection onto :math:`\{p \in \Delta_v : p_j = 0 \text{ off mask}\}`.

    Masked entries are moved below ``max(y[mask]) - 1`` before ``optax`` 's simplex projection:
    the projection's threshold is at least ``max(y) - 1``, so they come out exactly zero.
    """
    top = jnp.max(jnp.where(mask, y, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(mask, projection_simplex(jnp.where(mask, y, top - 2.0)), 0.0)


def project_capped_simplex(
    y: Float[Array, " v"], ub: Float[Array, " v"], num_bisect: int | None = None
) -> Float[Array, " v"]:
    r"""Projection onto :math:`\{p : 0 \le p \le u,\ \sum_j p_j = 1\}` (``u = 0`` masks a token).

    :math:`p = \mathrm{clip}(y - \tau, 0, u)` with :math:`\tau` the root of the monotone
    :math:`\sum_j \mathrm{clip}(y_j-\tau,0,u_j) = 1`: bisection, then one exact solve on the
    active set.  If :math:`\sum_j u_j < 1` the set is empty and ``u`` (the nearest point of the
    box to the hyperplane) is returned; callers detect that case separately.
    """
    if num_bisect is None:
        num_bisect = 64 if y.dtype == jnp.float64 else 40
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
    r"""Support function :math:`\max_{s \in \mathcal C} g^\top s`."""
    return -min_linear(-g, mask, ub)


def project(
    y: Float[Array, " v"], mask: Bool[Array, " v"], ub: Float[Array, " v"] | None
) -> Float[Array, " v"]:
    if ub is None:
        return project_masked_simplex(y, mask).astype(y.dtype)
    return project_capped_simplex(y, jnp.where(mask, ub, 0.0)).astype(y.dtype)


def uniform_on(mask: Bool[Array, " v"], dtype) -> Float[Array, " v"]:
    cnt = jnp.maximum(jnp.sum(mask), 1)
    return jnp.where(mask, 1.0 / cnt, 0.0).astype(dtype)


# --------------------------------------------------------------------------------------------
# Column weights of the quadratic penalty: rho_i on soft members' columns, h on hard columns.
# --------------------------------------------------------------------------------------------
def column_weights(
    problem: BottleneckProblem, rho: Float[Array, " n"], hard_weight: Float[Array, ""]
) -> Float[Array, " D"]:
    """Per-column weight ``w`` so that the penalty is ``0.5 * sum(w * (A^T p - m)**2)``."""
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
    soft = np.asarray(problem.soft, np.int64)
    L = jnp.sum(F * F) + hard_weight * problem.lipschitz_hard
    if soft.size:
        L = L + jnp.sum(jnp.asarray(rho)[soft] * problem.lipschitz_members[soft])
    return L


class FISTAState(NamedTuple):
    """Iterates of :class:`FISTA` (one row)."""

    x: Float[Array, " v"]  # current feasible iterate
    gx: Float[Array, " v"]  # grad f(x)
    y: Float[Array, " v"]  # extrapolated point
    gy: Float[Array, " v"]  # grad f(y) (affine gradient => combination of gx's)
    t: Float[Array, ""]
    f: Float[Array, ""]  # f(x)
    gap: Float[Array, ""]  # Frank-Wolfe gap at x
    r: Float[Array, " D"]  # A^T x - m
    iterations: Int[Array, ""]
    stop: Bool[Array, ""]  # extra stopping rule fired


def _check_row(problem, c, F, mask, m, rho):
    v, D, n = problem.vocab_size, problem.A.shape[1], problem.num_members
    if c.shape != (v,):
        raise ValueError(f"c must have shape (v,)=({v},) for one row (vmap for a batch), got {c.shape}")
    if F.ndim != 2 or F.shape[0] != v:
        raise ValueError(f"F must have shape (v={v}, k) (k may be 0), got {F.shape}")
    if mask.shape != (v,):
        raise ValueError(f"mask must have shape ({v},), got {mask.shape}")
    if m.shape != (D,):
        raise ValueError(f"m must have shape (D={D},) (problem.moments of one row), got {m.shape}")
    if jnp.shape(rho) != (n,):
        raise ValueError(f"rho must have shape (n={n},) (one weight per member), got {jnp.shape(rho)}")


@dataclasses.dataclass(frozen=True)
class FISTA:
    """FISTA with adaptive restart over the masked (optionally capped) simplex.

    Attributes:
      tol: relative Frank-Wolfe gap: stop when ``gap <= tol * (1 + |f|)``.
      max_iters: iteration cap (status ``MAX_ITERS`` when reached).
      restart: gradient-scheme adaptive restart (O'Donoghue & Candes).
      adjoint: gradients of ``p`` with respect to ``c``, ``F``, ``m``, ``rho``, ``hard_weight``
        and the problem's arrays: ``"implicit"`` (the KKT system on the support,
        :mod:`jaxens.solvers.fixed_point_adjoint`) or ``"unrolled"`` (reverse mode through
        ``unroll_steps`` FISTA iterations run from the converged point; the forward value is
        the converged ``p`` either way).  ``ub`` gets no gradient.
      unroll_steps: iterations of the unrolled adjoint.
    """

    tol: float = 1e-6
    max_iters: int = 2000
    restart: bool = True
    adjoint: Literal["implicit", "unrolled"] = "implicit"
    unroll_steps: int = 500

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"Expected tol > 0, got {self.tol}")
        if not self.max_iters >= 1:
            raise ValueError(f"Expected max_iters >= 1, got {self.max_iters}")
        if self.adjoint not in ("implicit", "unrolled"):
            raise ValueError(f"adjoint must be 'implicit' or 'unrolled', got {self.adjoint!r}")
        if self.unroll_steps < 1:
            raise ValueError(f"Expected unroll_steps >= 1, got {self.unroll_steps}")

    def solve(
        self,
        problem: BottleneckProblem,
        c: Float[Array, " v"],
        F: Float[Array, "v k"],
        mask: Bool[Array, " v"],
        m: Float[Array, " D"],
        rho: Float[Array, " n"],
        hard_weight: float | Float[Array, ""] = 0.0,
        p0: Float[Array, " v"] | None = None,
        ub: Float[Array, " v"] | None = None,
    ) -> tuple[Solution, Float[Array, " v"]]:
        """Solve one row; returns ``(Solution, p)`` (``p`` is the final iterate, for warm starts).

        ``ub`` optionally caps ``p <= ub`` (used by basis-aware truncation).  ``mask`` must
        allow at least one token.  ``vmap`` over all array arguments for a batch.  Entries of
        ``c`` / ``F`` off the mask are ignored (may be ``inf``); a non-finite entry on the mask
        (e.g. ``-log 0``: mask such tokens out) or in ``m`` gives status ``NONFINITE_INPUT``
        and the uniform distribution over the mask.
        """
        sol, state = _fista_solve(self, problem, c, F, mask, m, rho, hard_weight, p0, ub, None, None)
        return sol, state.x

    def run(
        self, problem, c, F, mask, m, rho, hard_weight=0.0, p0=None, ub=None, stop_fn=None, stop_arg=None
    ) -> tuple[Solution, FISTAState]:
        """Like :meth:`solve` but returns the full :class:`FISTAState`.

        ``stop_fn(state, stop_arg) -> bool`` adds a stopping rule (a module-level function, so
        it is hashable and does not recompile; ``stop_arg`` is a traced pytree).  When it fires
        the status is ``SOLVED``.
        """
        return _fista_solve(self, problem, c, F, mask, m, rho, hard_weight, p0, ub, stop_fn, stop_arg)


@functools.partial(jax.jit, static_argnames=("solver", "stop_fn"))
def _fista_solve(
    solver: FISTA,
    problem: BottleneckProblem,
    c,
    F,
    mask,
    m,
    rho,
    hard_weight,
    p0,
    ub,
    stop_fn: Callable[[FISTAState, object], Array] | None,
    stop_arg,
):
    dtype = problem.A.dtype
    c = jnp.asarray(c, dtype)
    F = jnp.asarray(F, dtype)
    m = jnp.asarray(m, dtype)
    mask = jnp.asarray(mask, bool)
    rho = jnp.asarray(rho, dtype)
    _check_row(problem, c, F, mask, m, rho)
    h = jnp.asarray(hard_weight, dtype)
    if ub is not None:
        ub = jnp.asarray(ub, dtype)
        if ub.shape != mask.shape:
            raise ValueError(f"ub must have shape {mask.shape}, got {ub.shape}")

    finite_in = (
        jnp.all(jnp.isfinite(jnp.where(mask, c, 0.0)))
        & jnp.all(jnp.isfinite(jnp.where(mask[:, None], F, 0.0)))
        & jnp.all(jnp.isfinite(m))
        & jnp.all(jnp.isfinite(rho))
        & jnp.isfinite(h)
    )
    if ub is not None:
        finite_in &= jnp.all(jnp.isfinite(jnp.where(mask, ub, 0.0)))
    # Sanitise so the loop never sees NaN (the row is overwritten at the end anyway).
    c = jnp.where(mask & jnp.isfinite(c), c, 0.0)
    F = jnp.where(jnp.isfinite(F) & mask[:, None], F, 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    rho = jnp.where(jnp.isfinite(rho), rho, 0.0)
    h = jnp.where(jnp.isfinite(h), h, 0.0)
    if ub is not None:
        ub = jnp.where(mask & jnp.isfinite(ub), ub, 0.0)

    params = (problem, c, F, m, rho, h)
    problem, c, F, m, rho, h = jax.lax.stop_gradient(params)
    if ub is not None:
        ub = jax.lax.stop_gradient(ub)
    A = problem.A
    w = column_weights(problem, rho, h)
    L = lipschitz(problem, F, rho, h)
    L = jnp.maximum(L, jnp.asarray(1e-12, dtype) * (1.0 + jnp.max(jnp.abs(c))))
    step = 1.0 / L

    def evaluate(x):
        Fx = F.T @ x
        r = x @ A - m
        g = F @ Fx + c + A @ (w * r)
        f = 0.5 * jnp.sum(Fx * Fx) + c @ x + 0.5 * jnp.sum(w * r * r)
        gap = g @ x - min_linear(g, mask, ub)
        return g, f, gap, r

    x0 = uniform_on(mask, dtype) if p0 is None else project(jax.lax.stop_gradient(jnp.asarray(p0, dtype)), mask, ub)
    g0, f0, gap0, r0 = evaluate(x0)
    zero_i = jnp.zeros((), jnp.int32)
    state = FISTAState(x0, g0, x0, g0, jnp.ones((), dtype), f0, gap0, r0, zero_i, jnp.zeros((), bool))
    if stop_fn is not None:
        state = state._replace(stop=stop_fn(state, stop_arg))

    def converged(s):
        return s.gap <= solver.tol * (1.0 + jnp.abs(s.f))

    def cond(s):
        return (s.iterations < solver.max_iters) & ~converged(s) & ~s.stop & jnp.isfinite(s.f)

    def body(s):
        z = project(s.y - step * s.gy, mask, ub)
        gz, fz, gapz, rz = evaluate(z)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t))
        if solver.restart:
            do_restart = jnp.dot(s.y - z, z - s.x) > 0
            t_new = jnp.where(do_restart, jnp.ones_like(t_new), t_new)
            mom = jnp.where(do_restart, 0.0, (s.t - 1.0) / t_new)
        else:
            mom = (s.t - 1.0) / t_new
        y = z + mom * (z - s.x)
        gy = gz + mom * (gz - s.gx)
        new = FISTAState(z, gz, y, gy, t_new, fz, gapz, rz, s.iterations + 1, s.stop)
        if stop_fn is not None:
            new = new._replace(stop=stop_fn(new, stop_arg))
        # never step onto a non-finite iterate: keep the last finite one
        ok = jnp.isfinite(fz) & jnp.all(jnp.isfinite(z))
        bad = s._replace(f=jnp.asarray(jnp.nan, dtype))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, bad)

    state = jax.lax.while_loop(cond, body, state)
    numerr = ~jnp.isfinite(state.f)
    status = jnp.where(converged(state) | state.stop, Status.SOLVED, Status.MAX_ITERS)
    status = jnp.where(numerr, Status.NUMERICAL_ERROR, status)
    status = jnp.where(finite_in, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    x = state.x
    if solver.adjoint == "implicit":
        cap = jnp.ones_like(x) if ub is None else ub
        free = (mask & (x > 0) & (x < cap)).astype(dtype)
        x_d = _fista_attach(x, params, free, jnp.where(free > 0, 0.0, x))
    else:
        x_d = _unrolled(solver, params, mask, ub, x, step)
    p = jnp.where(finite_in, x_d, uniform_on(mask, dtype))
    sol = Solution(
        p=p,
        status=status,
        primal_residual=problem.hard_residual(p, m),
        gap=jnp.where(finite_in, state.gap, jnp.inf).astype(dtype),
        iterations=state.iterations,
        certificate=jnp.zeros((A.shape[1],), dtype),
        certificate_margin=jnp.zeros((), dtype),
    )
    return sol, jax.lax.stop_gradient(state)


def _fista_grad(p, params):
    problem, c, F, m, rho, h = params
    w = column_weights(problem, rho, h)
    return F @ (F.T @ p) + c + problem.A @ (w * (p @ problem.A - m))


def _fista_eq(params):
    problem = params[0]
    dtype = problem.A.dtype
    return jnp.ones((problem.vocab_size, 1), dtype), jnp.ones((1,), dtype)


def _fista_factor(params):
    """``U`` with ``U U^T`` the Hessian: ``[F, sqrt(w_j) A_j for the weighted columns]``."""
    problem, _, F, _, rho, h = params
    cols = problem.columns(problem.constrained)
    if cols.size == 0:
        return F
    w = column_weights(problem, rho, h)[cols]
    return jnp.concatenate([F, problem.A[:, cols] * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]], axis=1)


_fista_attach = support_adjoint(_fista_grad, _fista_eq, _fista_factor)


def _unrolled(solver: FISTA, params, mask, ub, x, step):
    """``unroll_steps`` differentiable FISTA iterations from the converged ``x`` (forward value:
    ``x``; backward: reverse mode through the iterations)."""
    x = jax.lax.stop_gradient(x)
    step = jax.lax.stop_gradient(step)

    def body(_, carry):
        xk, y, t = carry
        z = project(y - step * _fista_grad(y, params), mask, ub)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        mom = (t - 1.0) / t_new
        if solver.restart:
            do_restart = jax.lax.stop_gradient(jnp.dot(y - z, z - xk) > 0)
            t_new = jnp.where(do_restart, jnp.ones_like(t_new), t_new)
            mom = jnp.where(do_restart, 0.0, mom)
        return z, z + mom * (z - xk), t_new

    xt, _, _ = jax.lax.fori_loop(0, solver.unroll_steps, body, (x, x, jnp.ones((), x.dtype)))
    return jax.lax.stop_gradient(x) + xt - jax.lax.stop_gradient(xt)
