r"""OSQP-style ADMM for the bottleneck QP / LP (and the dispatch to the min-underestimation LP).

**Problem** (one row, :class:`~jaxens.solvers.instances.QuadraticProgram`; a
:class:`~jaxens.solvers.instances.LinearProgram` is the case ``F`` empty):

.. math::

    \min_p\ \tfrac12\lVert F^\top p\rVert^2 + c^\top p
        + \sum_{i\in S}\tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2
    \quad\text{s.t.}\quad Q^\top p = \beta,\quad 0 \le p \le u,

with ``Q`` the orthonormal basis of :math:`\mathrm{span}[A_H, \mathbf 1]` cached in the problem
(:math:`Q^\top p=\beta` is :math:`A_H^\top p = m_H,\ \mathbf 1^\top p = 1`) and :math:`u = 0` off
the mask (1, or given caps, on it).


Iteration: the splitting of :mod:`jaxens.solvers.splitting` (x on the affine set, z in the box,
Woodbury x-update, linearised soft members, OSQP residuals and adaptive :math:`\rho`), run by
:func:`jaxens.solvers.base.iterate`; then the active-set polish of :mod:`jaxens.solvers.polish`.
The returned ``p`` is ``z`` renormalised (a distribution); ``Solution.gap`` is the dual residual
(or the polish's KKT violation).  An infeasible row never converges (status ``MAX_ITERS``, large
primal residual): decide feasibility first with :func:`jaxens.solvers.least_squares.least_squares`.
A :class:`~jaxens.solvers.instances.RatioProgram` goes to :mod:`jaxens.solvers.admm_ratio`.

**Gradients.**  The loop runs on stopped inputs; gradients of ``p`` with respect to ``c``,
``F``, ``m``, ``rho`` and the problem's arrays (``A``, ``Q``, ``T_pinv``) come from
``adjoint``:

* :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (default): the KKT conditions on the
  returned support (:mod:`jaxens.solvers.support_adjoint`: one ``K x K`` eigendecomposition,
  ``K = k + D_S``, no iteration).  For the LP (``F`` empty, no soft members) the optimum is a
  vertex: the gradient is that of the basic solution (zero with respect to ``c``, non-zero with
  respect to ``m``), exact at a non-degenerate vertex; ``EntropicNewton`` on the same
  :class:`~jaxens.solvers.instances.LinearProgram` gives a gradient that is smooth in ``c``.
* :class:`~jaxens.solvers.adjoint.UnrolledAdjoint`: reverse mode through ``steps`` (default
  2000) further ADMM iterations (fixed :math:`\rho`, no checks) started from the converged
  state; the forward value is the converged ``p`` either way.  The derivative iterates converge
  at ADMM's linear rate, so ``steps`` must be of the order of the forward iteration count
  (``Solution.iterations``) for the two adjoints to agree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jaxens.problem import BottleneckProblem
from jaxens.solvers.admm_ratio import ratio_value, solve_ratio
from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint, check_adjoint
from jaxens.solvers.base import AbstractIterativeSolver, iterate
from jaxens.solvers.fista import check_row, sanitize_row
from jaxens.solvers.instances import LinearProgram, QuadraticProgram, RatioProgram
from jaxens.solvers.polish import num_soft_cols, polish_qp, polish_size
from jaxens.solvers.projections import column_weights, uniform_on
from jaxens.solvers.solution import Solution
from jaxens.solvers.splitting import (
    ADMMState,
    SplittingOps,
    admm_step,
    finish,
    initial_state,
    normalise,
    straight_through,
    unrolled_tail,
    warm_state,
)
from jaxens.solvers.qp_terms import qp_attach, qp_factor, qp_grad

__all__ = ["ADMM", "ADMMState"]

_UNROLL_STEPS = 2000  # UnrolledAdjoint(steps=None)


@dataclasses.dataclass(frozen=True)
class ADMM(AbstractIterativeSolver):
    """OSQP-style ADMM (see the module docstring for the math).

    Accepts :class:`~jaxens.solvers.instances.LinearProgram`,
    :class:`~jaxens.solvers.instances.QuadraticProgram` and
    :class:`~jaxens.solvers.instances.RatioProgram`.  The warm start is a previous
    :class:`~jaxens.solvers.splitting.ADMMState` (full warm start, dual and :math:`\\rho`
    included) or a distribution ``p``; the next warm start is the final state.

    Attributes:
      rho0: initial penalty :math:`\\rho`.
      alpha: over-relaxation in ``(0, 2)`` (OSQP uses 1.6).
      adaptive_rho: rescale :math:`\\rho` from the residual ratio at each check.
      tol_abs, tol_rel: OSQP absolute / relative tolerances (``None``: by the working dtype,
        ``1e-6 / 1e-5`` in float32 and bfloat16, ``1e-7 / 1e-6`` in float64).
      max_iters: iteration cap (``None``: 10,000 in float32, 50,000 in float64, whose tighter
        tolerances need more of ADMM's linearly converging tail).
      check_every: iterations between residual checks (and :math:`\\rho` updates).
      ratio_scale: :math:`\\kappa` for :class:`~jaxens.solvers.instances.RatioProgram` (``None``: ``0.01 sum(r) / |mask|``,
        which puts the lower bound ``1 / sum(r)`` of ``s`` on the scale of ``p`` times 0.01);
        ``s`` is represented as ``s * kappa``.
      polish: active-set solution polishing (OSQP's, Stellato et al. 2020, §4.3; see the module
        docstring): guess the active set from the last iterate, solve the equality-constrained
        problem on the free tokens through its KKT system, keep the result only if it passes the
        KKT check.  Makes float32 answers exact (and reproducible) at the optimum's vertex /
        face.  Its outcome is ``state.polish`` (:class:`~jaxens.solvers.polish.PolishStatus`).
      polish_refine: iterative-refinement steps of the polish's KKT solve.
      polish_rounds: the most KKT solves of the polish: the first on the active set guessed
        from the iterate, each further one after a one-token active-set correction (only while
        rejected).
      polish_delta: quasi-definite regularisation of the polish's (equilibrated) KKT matrix
        (``None``: ``1e-6`` in float32, ``1e-10`` in float64), removed by ``polish_refine``
        refinement steps; see :func:`~jaxens.solvers.support_adjoint.kkt_solve`.
      polish_cap: the most free tokens the polish accepts (``None``: ``2 (r + k)`` for
        the QP, ``2 r`` for :class:`~jaxens.solvers.instances.RatioProgram`; a vertex has at most ``r``).  Its KKT
        solve factorises a matrix of size ``cap + r``.
      polish_max_size: the polish runs only when its KKT matrix (``cap + r``, static) has at most
        this size (its factorisation is a sequential loop, without LAPACK); larger problems
        return the ADMM iterate (``NOT_RUN``).
      polish_iters: CG steps of the fallback correction when the active-set polish is not
        accepted (0 disables it): ``z`` gets the scaled minimum-norm correction
        ``p = z - z * (Q y)``, ``Q^T Z Q y = Q^T z - beta``, which keeps its support and sign; it
        is kept only if it lowers the equality residual.
      rho_max: upper clip of the adaptive :math:`\\rho` (the lower clip is ``1e-6``).
      adjoint: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (KKT on the support / basic
        solution) or :class:`~jaxens.solvers.adjoint.UnrolledAdjoint` (reverse mode through
        ``steps`` ADMM iterations from the converged state, default 2000); see the module
        docstring.  The forward value does not depend on it.  ``ub`` gets no gradient.
    """

    rho0: float = 0.1
    alpha: float = 1.6
    adaptive_rho: bool = True
    tol_abs: float | None = None
    tol_rel: float | None = None
    max_iters: int | None = None
    check_every: int = 25
    ratio_scale: float | None = None
    rho_max: float = 1e8
    polish: bool = True
    polish_refine: int = 3
    polish_rounds: int = 10
    polish_delta: float | None = None
    polish_cap: int | None = None
    polish_iters: int = 50
    polish_max_size: int = 768
    adjoint: AbstractAdjoint = ImplicitAdjoint()

    accepts: ClassVar[tuple[type, ...]] = (LinearProgram, QuadraticProgram, RatioProgram)

    def __post_init__(self):
        if not self.rho0 > 0:
            raise ValueError(f"Expected rho0 > 0, got {self.rho0}")
        if not 0 < self.alpha < 2:
            raise ValueError(f"Expected 0 < alpha < 2, got {self.alpha}")
        ta, tr = self.tolerances(jnp.float32)
        if not (ta >= 0 and tr >= 0 and ta + tr > 0):
            raise ValueError(f"Expected non-negative tolerances, got {self.tol_abs}, {self.tol_rel}")
        check_adjoint(self.adjoint)
        if not ((self.max_iters is None or self.max_iters >= 1) and self.check_every >= 1):
            raise ValueError(
                f"Expected max_iters >= 1 and check_every >= 1, got {self.max_iters}, {self.check_every}"
            )

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(tol_abs, tol_rel)`` for the working ``dtype`` (explicit values win)."""
        wide = jnp.finfo(dtype).bits >= 64
        ta = self.tol_abs if self.tol_abs is not None else (1e-7 if wide else 1e-6)
        tr = self.tol_rel if self.tol_rel is not None else (1e-6 if wide else 1e-5)
        return ta, tr

    def polish_regularisation(self, dtype) -> float:
        """``polish_delta`` for the working ``dtype``."""
        if self.polish_delta is not None:
            return self.polish_delta
        return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-6

    def iteration_cap(self, dtype) -> int:
        """``max_iters`` for the working ``dtype``."""
        if self.max_iters is not None:
            return self.max_iters
        return 50000 if jnp.finfo(dtype).bits >= 64 else 10000

    def solve(
        self,
        problem: BottleneckProblem,
        instance: LinearProgram | QuadraticProgram | RatioProgram,
        warm: ADMMState | Float[Array, " v"] | None = None,
    ) -> tuple[Solution, ADMMState]:
        """Solve one row (``vmap`` for a batch); returns ``(Solution, final ADMMState)``.

        For a :class:`~jaxens.solvers.instances.RatioProgram` (``min s s.t. p feasible,
        0 <= p <= s r``) the state's vectors have length ``v + 1`` and the optimal ``s`` is
        :meth:`ratio_value` of the returned ``p``; ``Solution.gap`` is then the certified relative gap
        (:mod:`jaxens.solvers.admm_ratio`), and ``SOLVED`` needs it within ``tol_rel``.  The
        default solver of that instance is :class:`~jaxens.solvers.ratio_ipm.RatioIPM`."""
        self.check_instance(instance)
        if isinstance(instance, RatioProgram):
            return solve_ratio(self, problem, instance.r, instance.mask, instance.m, warm)
        if isinstance(instance, LinearProgram):
            c = jnp.asarray(instance.c)
            F = jnp.zeros((problem.vocab_size, 0), c.dtype)
            rho = jnp.zeros((problem.num_members,), c.dtype) if instance.rho is None else instance.rho
            return _admm_solve(self, problem, c, F, instance.mask, instance.m, rho, warm, None)
        c, F, mask, m, rho, ub = instance
        return _admm_solve(self, problem, c, F, mask, m, rho, warm, ub)

    @staticmethod
    def ratio_value(p: Float[Array, "*B v"], r: Float[Array, "*B v"]) -> Float[Array, "*B"]:
        """The min-underestimation objective ``max_j p_j / r_j`` of a distribution ``p``."""
        return ratio_value(p, r)

    # ----- the iteration (driven by jaxens.solvers.base.iterate) -----
    def step(self, row: SplittingOps, state: ADMMState) -> ADMMState:
        return admm_step(self, row, state)

    def failed(self, row: SplittingOps, state: ADMMState) -> Bool[Array, ""]:
        return jnp.isnan(state.primal_residual)

    def converged(self, row: SplittingOps, state: ADMMState) -> Bool[Array, ""]:
        return state.converged

    def terminate(self, row: SplittingOps, state: ADMMState) -> Bool[Array, ""]:
        return state.converged | jnp.isnan(state.primal_residual)


def _qp_ops(problem: BottleneckProblem, c, F, mask, m, rho_s, box):
    """The x-/z-updates of the QP/LP splitting for one row (built from live or stopped data)."""
    dtype = problem.A.dtype
    Q, A = problem.Q, problem.A
    beta = problem.beta(m)
    xb = Q @ beta  # min-norm point of the affine set
    k = F.shape[1]
    if k:
        G = F - Q @ (Q.T @ F)
        lam, V = jnp.linalg.eigh(G.T @ G)
        GV = G @ V
        FFxb = F @ (F.T @ xb)
    soft = bool(problem.soft)
    if soft:
        w_cols = column_weights(problem, rho_s, jnp.zeros((), dtype))
        soft_idx = np.asarray(problem.soft, np.int64)
        L_S = jnp.sum(rho_s[soft_idx] * problem.lipschitz_members[soft_idx])
    else:
        L_S = jnp.zeros((), dtype)

    def proj_perp(y):
        return y - Q @ (Q.T @ y)

    def x_update(z, u, rho, x_prev):
        lin = c
        if soft:
            lin = lin + A @ (w_cols * (x_prev @ A - m))
        rp = rho + L_S
        w = (rho * (z - u) + L_S * x_prev - lin) / rp
        if not k:
            return xb + proj_perp(w)
        b = proj_perp(rp * w - FFxb)
        xp = (b - GV @ ((GV.T @ b) / (rp + lam))) / rp
        return xb + xp

    def z_update(w, rho):
        return jnp.clip(w, 0.0, box)

    def grad_norm(x):
        g = c
        if k:
            g = g + F @ (F.T @ x)
        return jnp.max(jnp.abs(g))

    return x_update, z_update, grad_norm, L_S, beta




@functools.partial(jax.jit, static_argnames=("solver",))
def _admm_solve(solver: ADMM, problem: BottleneckProblem, c, F, mask, m, rho, warm, ub):
    dtype = problem.A.dtype
    c, F, m = (jnp.asarray(a, dtype) for a in (c, F, m))
    mask = jnp.asarray(mask, bool)
    rho_s = jnp.asarray(rho, dtype)
    check_row(problem, c, F, mask, m, rho_s)
    v = problem.vocab_size
    finite_in, c, F, m, rho_s = sanitize_row(c, F, mask, m, rho_s)
    if ub is None:
        box = mask.astype(dtype)
    else:
        ub = jnp.asarray(ub, dtype)
        if ub.shape != (v,):
            raise ValueError(f"ub must have shape ({v},), got {ub.shape}")
        finite_in &= jnp.all(jnp.isfinite(jnp.where(mask, ub, 0.0)))
        box = jnp.where(mask & jnp.isfinite(ub), jnp.maximum(ub, 0.0), 0.0)
    box = jax.lax.stop_gradient(box)

    # The loop sees no tangents: gradients come from the adjoint below.
    params = (problem, c, F, m, rho_s)
    prob_ng, c_ng, F_ng, m_ng, rho_ng = jax.lax.stop_gradient(params)
    x_update, z_update, grad_norm, L_S, beta = _qp_ops(prob_ng, c_ng, F_ng, mask, m_ng, rho_ng, box)

    default = uniform_on(mask, dtype)
    x, z, u, rho0 = warm_state(warm, dtype, default)
    x, z, u = jax.lax.stop_gradient((x, z, u))
    rho0 = jnp.asarray(solver.rho0, dtype) if rho0 is None else jax.lax.stop_gradient(rho0)
    ops = SplittingOps(x_update, z_update, grad_norm, L_S)
    state, _, loop_status = iterate(solver, ops, initial_state(x, z, u, rho0), solver.iteration_cap(dtype))
    polished = None
    k_pol = F_ng.shape[1] + num_soft_cols(prob_ng)
    if solver.polish and polish_size(solver, prob_ng.Q.shape, k_pol) <= solver.polish_max_size:
        p_ng = (prob_ng, c_ng, F_ng, m_ng, rho_ng)
        U, g0 = qp_factor(p_ng), qp_grad(jnp.zeros((v,), dtype), p_ng)
        polished = polish_qp(solver, prob_ng.Q, beta, U, jnp.where(mask, g0, 0.0), mask, box, state)
    sol, state = finish(
        prob_ng, state, loop_status, mask, m_ng, finite_in, state.z, dtype, solver.polish_iters, prob_ng.Q, beta, polished
    )
    p = sol.p
    if isinstance(solver.adjoint, UnrolledAdjoint):
        xu, zu, _, _, _ = _qp_ops(problem, c, F, mask, m, rho_s, box)
        zt = unrolled_tail(solver, xu, zu, state, solver.adjoint.num_steps(_UNROLL_STEPS))
        p_d = straight_through(p, normalise(zt, mask))
    else:
        free = (mask & (p > 0) & (p < box)).astype(dtype)
        p_d = qp_attach(p, params, free, jnp.where(free > 0, 0.0, p))
    sol = sol._replace(p=jnp.where(finite_in, p_d, p))
    return sol, jax.lax.stop_gradient(state)
