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

Gradients (``adjoint``): the loop runs on stopped inputs.  :class:`~jaxens.solvers.adjoint.ImplicitAdjoint`
differentiates the KKT conditions of the returned point on its support, :math:`p = P(p - \nabla f(p))`
with :math:`P` the projection onto the face's affine hull (:mod:`jaxens.solvers.support_adjoint`;
here :math:`E = \mathbf 1`, the Hessian factor is :math:`U = [F,\ \sqrt{w_j}A_j]` over the
weighted columns: one ``K x K`` eigendecomposition per backward pass).
:class:`~jaxens.solvers.adjoint.UnrolledAdjoint` runs ``steps`` (default 500) FISTA iterations
from the converged point and differentiates through them (forward value unchanged).  Exact when the optimum is unique (the reduced Hessian is
non-singular on the support's tangent space), e.g. the least-squares phase of an infeasible row;
on a feasible row the least-squares optimum is a whole face and has no derivative.

The instance is a :class:`~jaxens.solvers.instances.PenalisedProgram`; the loop is
:func:`jaxens.solvers.base.iterate`.  The solver works on one row; ``jax.vmap`` it over a batch
(one compile).  No per-row ``v x D``
matrix is formed: ``A`` is shared, the per-row data are vectors (and ``F``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint, check_adjoint
from jaxens.solvers.base import AbstractIterativeSolver, iterate
from jaxens.solvers.instances import PenalisedProgram
from jaxens.solvers.projections import column_weights, lipschitz, min_linear, project, uniform_on
from jaxens.solvers.solution import Solution, Status
from jaxens.solvers.support_adjoint import support_adjoint

__all__ = ["FISTA", "FISTAState", "check_row", "sanitize_row"]

_UNROLL_STEPS = 500  # UnrolledAdjoint(steps=None)


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


class _Row(NamedTuple):
    """The row's (stopped) data the iteration closes over."""

    evaluate: Callable  # x -> (grad f, f, FW gap, A^T x - m)
    step: Float[Array, ""]  # 1 / L
    mask: Bool[Array, " v"]
    ub: Float[Array, " v"] | None
    stop_fn: Callable | None
    stop_arg: Any


def check_row(problem, c, F, mask, m, rho):
    """``ValueError`` with the shapes unless ``c, mask (v,)``, ``F (v, k)``, ``m (D,)``, ``rho (n,)``."""
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


def sanitize_row(c, F, mask, m, rho):
    """``(finite, c, F, m, rho)``: whether the row's data are finite (on the mask), and the data
    with every non-finite entry (and ``c``, ``F`` off the mask) replaced by 0, so that a solver's
    loop never sees NaN (the caller overwrites a non-finite row's answer)."""
    finite = (
        jnp.all(jnp.isfinite(jnp.where(mask, c, 0.0)))
        & jnp.all(jnp.isfinite(jnp.where(mask[:, None], F, 0.0)))
        & jnp.all(jnp.isfinite(m))
        & jnp.all(jnp.isfinite(rho))
    )
    c = jnp.where(mask & jnp.isfinite(c), c, 0.0)
    F = jnp.where(jnp.isfinite(F) & mask[:, None], F, 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    rho = jnp.where(jnp.isfinite(rho), rho, 0.0)
    return finite, c, F, m, rho


@dataclasses.dataclass(frozen=True)
class FISTA(AbstractIterativeSolver):
    r"""FISTA with adaptive restart over the masked (optionally capped) simplex.

    Minimises :math:`c^\top p + \tfrac12\lVert F^\top p\rVert^2
    + \tfrac{\kappa}{2}\lVert A_H^\top p - m_H\rVert^2 + \sum_{i\in S}\tfrac{\rho_i}{2}
    \lVert A_i^\top p - m_i\rVert^2` over :math:`\{p \ge 0,\ \mathbf 1^\top p = 1,\ p \le u\}`
    with steps :math:`y - \nabla f(y)/L` projected onto that set
    (:mod:`~jaxens.solvers.projections`).

    Accepts :class:`~jaxens.solvers.instances.PenalisedProgram`; the warm start is a
    distribution ``p0`` (projected onto the feasible set), the next warm start the final ``x``.

    Attributes:
      tol: relative Frank-Wolfe gap: stop when ``gap <= tol * (1 + |f|)``.
      max_iters: iteration cap (status ``MAX_ITERS`` when reached).
      restart: gradient-scheme adaptive restart (O'Donoghue & Candes).
      adjoint: gradients of ``p`` with respect to ``c``, ``F``, ``m``, ``rho``, ``hard_weight``
        and the problem's arrays: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (the KKT
        system on the support, :mod:`jaxens.solvers.support_adjoint`) or
        :class:`~jaxens.solvers.adjoint.UnrolledAdjoint` (reverse mode through ``steps``
        FISTA iterations, default 500, run from the converged point; the forward value is the
        converged ``p`` either way).  ``ub`` gets no gradient.
    """

    tol: float = 1e-6
    max_iters: int = 2000
    restart: bool = True
    adjoint: AbstractAdjoint = ImplicitAdjoint()

    accepts: ClassVar[tuple[type, ...]] = (PenalisedProgram,)

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"Expected tol > 0, got {self.tol}")
        if not self.max_iters >= 1:
            raise ValueError(f"Expected max_iters >= 1, got {self.max_iters}")
        check_adjoint(self.adjoint)

    def solve(
        self, problem: BottleneckProblem, instance: PenalisedProgram, warm: Float[Array, " v"] | None = None
    ) -> tuple[Solution, Float[Array, " v"]]:
        """Solve one row; returns ``(Solution, x)`` (``x`` the final iterate, for warm starts).

        ``instance.mask`` must allow at least one token.  Entries of ``c`` / ``F`` off the mask
        are ignored (may be ``inf``); a non-finite entry on the mask (e.g. ``-log 0``: mask such
        tokens out) or in ``m`` gives status ``NONFINITE_INPUT`` and the uniform distribution
        over the mask.
        """
        sol, state = self.run(problem, instance, warm)
        return sol, state.x

    def run(
        self,
        problem: BottleneckProblem,
        instance: PenalisedProgram,
        warm: Float[Array, " v"] | None = None,
        stop_fn: Callable[[FISTAState, Any], Array] | None = None,
        stop_arg: Any = None,
    ) -> tuple[Solution, FISTAState]:
        """Like :meth:`solve` but returns the full :class:`FISTAState`.

        ``stop_fn(state, stop_arg) -> bool`` adds a stopping rule (a module-level function, so
        it is hashable and does not recompile; ``stop_arg`` is a traced pytree).  When it fires
        the status is ``SOLVED``.
        """
        self.check_instance(instance)
        c, F, mask, m, rho, hard_weight, ub = instance
        return _fista_solve(self, problem, c, F, mask, m, rho, hard_weight, warm, ub, stop_fn, stop_arg)

    # ----- the iteration (driven by jaxens.solvers.base.iterate) -----
    def step(self, row: _Row, s: FISTAState) -> FISTAState:
        z = project(s.y - row.step * s.gy, row.mask, row.ub)
        gz, fz, gapz, rz = row.evaluate(z)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t))
        if self.restart:
            do_restart = jnp.dot(s.y - z, z - s.x) > 0
            t_new = jnp.where(do_restart, jnp.ones_like(t_new), t_new)
            mom = jnp.where(do_restart, 0.0, (s.t - 1.0) / t_new)
        else:
            mom = (s.t - 1.0) / t_new
        y = z + mom * (z - s.x)
        gy = gz + mom * (gz - s.gx)
        new = FISTAState(z, gz, y, gy, t_new, fz, gapz, rz, s.iterations + 1, s.stop)
        if row.stop_fn is not None:
            new = new._replace(stop=row.stop_fn(new, row.stop_arg))
        # never step onto a non-finite iterate: keep the last finite one
        ok = jnp.isfinite(fz) & jnp.all(jnp.isfinite(z))
        bad = s._replace(f=jnp.asarray(jnp.nan, s.f.dtype))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, bad)

    def _gap_small(self, s: FISTAState) -> Bool[Array, ""]:
        return s.gap <= self.tol * (1.0 + jnp.abs(s.f))

    def failed(self, row: _Row, s: FISTAState) -> Bool[Array, ""]:
        return ~jnp.isfinite(s.f)

    def converged(self, row: _Row, s: FISTAState) -> Bool[Array, ""]:
        return self._gap_small(s) | s.stop

    def terminate(self, row: _Row, s: FISTAState) -> Bool[Array, ""]:
        return self.converged(row, s) | self.failed(row, s)


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
    check_row(problem, c, F, mask, m, rho)
    h = jnp.asarray(hard_weight, dtype)
    if ub is not None:
        ub = jnp.asarray(ub, dtype)
        if ub.shape != mask.shape:
            raise ValueError(f"ub must have shape {mask.shape}, got {ub.shape}")

    finite_in, c, F, m, rho = sanitize_row(c, F, mask, m, rho)
    finite_in &= jnp.isfinite(h)
    if ub is not None:
        finite_in &= jnp.all(jnp.isfinite(jnp.where(mask, ub, 0.0)))
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

    row = _Row(evaluate, step, mask, ub, stop_fn, stop_arg)
    state, _, status = iterate(solver, row, state, solver.max_iters)
    status = jnp.where(finite_in, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    x = state.x
    if isinstance(solver.adjoint, UnrolledAdjoint):
        x_d = _unrolled(solver, params, mask, ub, x, step)
    else:
        cap = jnp.ones_like(x) if ub is None else ub
        free = (mask & (x > 0) & (x < cap)).astype(dtype)
        x_d = _fista_attach(x, params, free, jnp.where(free > 0, 0.0, x))
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
    """``steps`` differentiable FISTA iterations from the converged ``x`` (forward value:
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

    steps = solver.adjoint.num_steps(_UNROLL_STEPS)
    xt, _, _ = jax.lax.fori_loop(0, steps, body, (x, x, jnp.ones((), x.dtype)))
    return jax.lax.stop_gradient(x) + xt - jax.lax.stop_gradient(xt)
