r"""Least-squares phase and Farkas certificate of the hard bottleneck constraints.

For one row, the least-squares relaxation is

.. math::  p_{LS} = \arg\min_{p \in \mathcal C} \lVert A_H^\top p - m_H\rVert^2,
           \qquad \mathcal C = \{p \in \Delta_v : p_j = 0 \text{ off mask}\ (,\ p \le u)\},

solved by Wolfe's minimum-norm point (:mod:`jaxens.solvers.min_norm_point`, the default without
caps: exact on the support, a few passes over ``A_H``) or by :class:`~jaxens.solvers.fista.FISTA`
with hard weight ``h = 2`` (with caps, and for the differentiable ``least_squares`` objective)
(:class:`LeastSquares` is the same as a solver of :class:`~jaxens.solvers.instances.LeastSquaresProgram`).  With the residual
:math:`r = m_H - A_H^\top p_{LS}` the certificate is :math:`d = r/\lVert r\rVert` and

.. math::  \mathrm{margin}(d) = d^\top m_H - \sigma_{\mathcal C}(A_H d),\qquad
           \sigma_{\mathcal C}(g) = \max_{s\in\mathcal C} g^\top s
           \ (= \max_{k\in\mathrm{mask}} (A_H d)_k \text{ without caps}).

By minimax duality :math:`\max_{\lVert d\rVert\le1}\mathrm{margin}(d) = \min_{p\in\mathcal C}
\lVert m_H - A_H^\top p\rVert`, so (weak duality) a positive margin *proves* that no
:math:`p\in\mathcal C` satisfies :math:`A_H^\top p = m_H` (a Farkas certificate), and at the exact
least-squares optimum the margin equals :math:`\lVert r\rVert`.  For any iterate ``p`` the margin of
:math:`d = r/\lVert r\rVert` is exactly :math:`\lVert r\rVert - g_{FW}/(2\lVert r\rVert)` with
:math:`g_{FW}` the Frank-Wolfe gap of :math:`\lVert A_H^\top p - m_H\rVert^2` at ``p``; it is
computed directly from ``d`` anyway.

A second certificate costs no iteration: when :math:`C = [A_H, \mathbf 1]` is rank deficient
(duplicated members, :math:`nd + 1 > v`) the moment system can be inconsistent by itself, and the
part :math:`e = [m_H; 1] - C^\top x` (:math:`x = Q\beta`, the minimum-norm least-squares
solution) lies in the null space of ``C``; :math:`d = e_A/\lVert e\rVert` has margin
:math:`\lVert e\rVert`.  The solvers' constraints :math:`Q^\top p = \beta` are a least-squares
projection of :math:`C^\top p = [m_H; 1]` and cannot see ``e``, so the phase reports whichever
certificate has the larger margin.

Verdict (per row):

* ``INFEASIBLE`` iff ``margin > feas_tol`` (sound whenever the margin is evaluated accurately: a
  feasible row has margin ``<= 0``);
* ``SOLVED`` if the least-squares problem converged (FISTA gap) or ``||r||_2 <= feas_tol``
  (feasible to tolerance: then no certificate with margin above ``feas_tol`` can exist);
* ``MAX_ITERS`` otherwise (undecided).

``feas_tol = feas_rtol * max(1, ||m_H||_2)`` with ``feas_rtol`` = ``1e-4`` in float32 and
``1e-7`` in float64 by default (the rounding of ``A_H^T p`` over ``v`` terms is ~``1e-6`` relative
in float32).  With ``decide=True`` the loop stops as soon as the verdict is known (used by
basis-aware truncation); otherwise it runs to the least-squares tolerance (the
``least_squares`` objective) or until ``||r||_2 <= feas_tol`` (feasible to tolerance, where the
least-squares value is within ``feas_tol**2`` of its minimum 0).

The returned ``p`` is differentiable with respect to ``m`` and the problem's arrays through
FISTA's adjoint (``solver.adjoint``); the derivative exists where the least-squares optimum is
unique, i.e. on infeasible rows (a feasible row's optimum is a face of the feasible set).  The
verdict and the certificate's margin are piecewise constant / not meant for differentiation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxens.problem import BottleneckProblem
from jaxens.solvers.base import AbstractSolver
from jaxens.solvers.fista import FISTA, FISTAState
from jaxens.solvers.instances import LeastSquaresProgram, PenalisedProgram
from jaxens.solvers.min_norm_point import MinNormPoint, min_norm_point, support_gradient
from jaxens.solvers.projections import max_linear
from jaxens.solvers.solution import Solution, Status

__all__ = ["LeastSquares", "least_squares", "default_ls_solver", "default_feas_rtol"]

def default_ls_solver(dtype) -> FISTA:
    """FISTA for the least-squares phase: relative FW-gap tolerance ``1e-7`` (float64) or
    ``1e-5`` (float32, about the rounding level of the gap), at most 5000 iterations."""
    return FISTA(tol=1e-7 if jnp.dtype(dtype) == jnp.float64 else 1e-5, max_iters=5000)


def default_feas_rtol(dtype) -> float:
    """Relative feasibility tolerance per dtype (``1e-4`` float32, ``1e-7`` float64)."""
    return 1e-7 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _hard_res_norm(state: FISTAState, hard_cols) -> Array:
    return jnp.linalg.norm(state.r[hard_cols])


def _decided(state: FISTAState, arg) -> Array:
    """Stop rule for ``decide=True``: certified infeasible or feasible to tolerance."""
    feas_tol, hard_cols = arg
    rn = _hard_res_norm(state, hard_cols)
    # margin of d = r/||r|| from the FW gap of ||A_H^T p - m_H||^2 (exact identity, see module doc)
    margin = rn - state.gap / (2.0 * jnp.maximum(rn, jnp.finfo(rn.dtype).tiny))
    return (rn <= feas_tol) | (margin > feas_tol)


def _feasible_to_tol(state: FISTAState, arg) -> Array:
    """Stop rule without ``decide``: ``||r|| <= feas_tol`` (then ``f - f* <= feas_tol**2``)."""
    feas_tol, hard_cols = arg
    return _hard_res_norm(state, hard_cols) <= feas_tol


def least_squares(
    problem: BottleneckProblem,
    m: Float[Array, " D"],
    mask: Bool[Array, " v"],
    solver: FISTA | MinNormPoint | None = None,
    *,
    ub: Float[Array, " v"] | None = None,
    feas_rtol: float | None = None,
    decide: bool = False,
    p0: Float[Array, " v"] | None = None,
) -> Solution:
    """Least-squares phase with a Farkas certificate, for one row (``vmap`` for a batch).

    Args:
      problem: the bottleneck problem (its hard members define ``A_H``).
      m: all members' moments of this row, ``(D,)``.
      mask: allowed tokens, ``(v,)``.
      solver: the least-squares solver: :class:`~jaxens.solvers.min_norm_point.MinNormPoint`
        (the default without caps: Wolfe's algorithm, exact on the support, no gradient) or a
        :class:`~jaxens.solvers.fista.FISTA` instance (the default with caps,
        :func:`default_ls_solver` of the problem's dtype; differentiable through its adjoint).
      ub: optional caps ``p <= ub`` (basis-aware truncation).
      feas_rtol: relative feasibility tolerance (default per dtype, see module doc).
      decide: stop as soon as the feasibility verdict is known.
      p0: optional warm start.

    Returns:
      A :class:`Solution` whose ``p`` is the least-squares distribution, ``status`` the verdict,
      ``gap`` the (FISTA: absolute, MinNormPoint: relative) Frank-Wolfe gap, ``certificate`` the direction ``d`` (zeros outside the
      hard columns) and ``certificate_margin`` its margin.
    """
    return _least_squares(problem, m, mask, solver, ub, feas_rtol, decide, p0)


@dataclasses.dataclass(frozen=True)
class LeastSquares(AbstractSolver):
    """The least-squares phase as a solver: accepts
    :class:`~jaxens.solvers.instances.LeastSquaresProgram` and returns :func:`least_squares`'s
    solution (verdict and certificate); the warm start is a distribution ``p0``.

    Attributes:
      fista: a FISTA instance solving the least-squares problem (``None``: the minimum-norm
        point ``mnp`` without caps, :func:`default_ls_solver` of the problem's dtype with caps).
      mnp: the :class:`~jaxens.solvers.min_norm_point.MinNormPoint` settings used when ``fista``
        is ``None`` and there are no caps (default: differentiable on the support).
      feas_rtol: relative feasibility tolerance (``None``: :func:`default_feas_rtol`).
      decide: stop as soon as the feasibility verdict is known.
    """

    fista: FISTA | None = None
    mnp: MinNormPoint = MinNormPoint(differentiable=True)
    feas_rtol: float | None = None
    decide: bool = False

    accepts: ClassVar[tuple[type, ...]] = (LeastSquaresProgram,)

    def solve(
        self, problem: BottleneckProblem, instance: LeastSquaresProgram, warm: Float[Array, " v"] | None = None
    ) -> tuple[Solution, Float[Array, " v"] | None]:
        """``(least_squares(...), warm)``: the warm start is passed through unchanged."""
        self.check_instance(instance)
        solver = self.fista if self.fista is not None or instance.ub is not None else self.mnp
        sol = least_squares(
            problem, instance.m, instance.mask, solver, ub=instance.ub, feas_rtol=self.feas_rtol,
            decide=self.decide, p0=warm,
        )
        return sol, warm


@functools.partial(jax.jit, static_argnames=("solver", "feas_rtol", "decide"))
def _least_squares(problem, m, mask, solver, ub, feas_rtol, decide, p0):
    dtype = problem.A.dtype
    v, D = problem.A.shape
    if m.shape != (D,):
        raise ValueError(f"m must have shape (D={D},) for one row (vmap for a batch), got {m.shape}")
    if not problem.hard:
        raise ValueError("least_squares needs hard members (make_problem(..., hard=...))")
    if feas_rtol is None:
        feas_rtol = default_feas_rtol(dtype)
    if solver is None:
        solver = MinNormPoint() if ub is None else default_ls_solver(dtype)
    m = jnp.asarray(m, dtype)
    hard_cols = jnp.asarray(problem.columns(problem.hard))
    m_h = m[hard_cols]
    feas_tol = feas_rtol * jnp.maximum(1.0, jnp.linalg.norm(jnp.where(jnp.isfinite(m_h), m_h, 0.0)))
    if isinstance(solver, MinNormPoint):
        if ub is not None:
            raise ValueError("MinNormPoint does not take caps (ub); use FISTA() for a capped least-squares phase")
        sol = _mnp_solution(problem, m, m_h, mask, solver, feas_tol)
    else:
        zeros_v = jnp.zeros((v,), dtype)
        penalised = PenalisedProgram(
            zeros_v, jnp.zeros((v, 0), dtype), mask, m, jnp.zeros((problem.num_members,), dtype), 2.0, ub
        )
        sol, state = solver.run(
            problem, penalised, p0, stop_fn=_decided if decide else _feasible_to_tol, stop_arg=(feas_tol, hard_cols)
        )
    p = sol.p
    r = m_h - problem.hard_products(p)  # m_H - A_H^T p
    rn = jnp.linalg.norm(r)
    d = r / jnp.maximum(rn, jnp.finfo(dtype).tiny)
    ub_eff = None if ub is None else jnp.where(mask, jnp.asarray(ub, dtype), 0.0)
    margin = d @ m_h - max_linear(problem.A_hard @ d, mask, ub_eff)
    margin = jnp.where(rn > 0, margin, -jnp.inf)
    # Exact inconsistency of the moment system itself: when [A_H, 1] is rank deficient
    # (duplicated members, n d + 1 > v), [m_H; 1] may leave its row space, and the solvers'
    # Q^T p = beta (a least-squares projection of the constraints) silently drops that part.
    # e = [m_H; 1] - [A_H, 1]^T x (x = Q beta, the min-norm least-squares solution) lies in the
    # null space of [A_H, 1], so d = e_A / ||e|| has margin ||e|| with no iteration at all.
    xh = problem.Q @ problem.beta(m)
    e_m = m_h - problem.hard_products(xh)
    e_1 = 1.0 - jnp.sum(xh)
    en = jnp.sqrt(jnp.sum(e_m * e_m) + e_1 * e_1)
    d_null = e_m / jnp.maximum(en, jnp.finfo(dtype).tiny)
    margin_null = d_null @ m_h - max_linear(problem.A_hard @ d_null, mask, ub_eff)
    margin_null = jnp.where(en > 0, margin_null, -jnp.inf)
    use_null = margin_null > margin
    d = jnp.where(use_null, d_null, d)
    margin = jnp.where(use_null, margin_null, margin)
    box_empty = (
        jnp.zeros((), bool) if ub_eff is None else jnp.sum(ub_eff) < 1.0 - jnp.finfo(dtype).eps * v
    )
    infeasible = (margin > feas_tol) | box_empty
    ok = sol.status == Status.SOLVED
    status = jnp.where(infeasible, Status.INFEASIBLE, jnp.where(ok | (rn <= feas_tol), Status.SOLVED, sol.status))
    status = jnp.where(sol.status >= Status.NONFINITE_INPUT, sol.status, status).astype(jnp.int32)
    cert = jnp.zeros((D,), dtype).at[hard_cols].set(d)
    return sol._replace(
        status=status,
        certificate=jnp.where(status == Status.INFEASIBLE, cert, 0.0),
        certificate_margin=jnp.where(jnp.isfinite(margin), margin, 0.0).astype(dtype),
    )


def _mnp_solution(problem, m, m_h, mask, settings: MinNormPoint, feas_tol) -> Solution:
    """The least-squares phase by Wolfe's minimum-norm point (:mod:`jaxens.solvers.min_norm_point`;
    ``p`` carries the support gradient when ``settings.differentiable``, otherwise none)."""
    G_d, m_d = problem.A_hard, m_h
    G, m_h = jax.lax.stop_gradient((G_d, m_d))
    res = min_norm_point(G, m_h, mask, settings, jax.lax.stop_gradient(feas_tol))
    dtype = G.dtype
    if settings.differentiable:
        res = res._replace(p=support_gradient(G_d, m_d, res.p, res.support, res.support >= 0))
    finite = jnp.all(jnp.isfinite(m_h)) & jnp.all(jnp.isfinite(res.p))
    status = jnp.where(res.converged, Status.SOLVED, Status.MAX_ITERS)
    status = jnp.where(finite, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    D = problem.A.shape[1]
    return Solution(
        p=res.p,
        status=status,
        primal_residual=jnp.max(jnp.abs(res.x)),
        gap=res.gap.astype(dtype),
        iterations=res.majors,
        certificate=jnp.zeros((D,), dtype),
        certificate_margin=jnp.zeros((), dtype),
    )
