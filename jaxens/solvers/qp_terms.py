r"""The bottleneck QP's terms in the solvers' parameter tuple ``params = (problem, c, F, m, rho)``.

.. math::  f(p) = \tfrac12\lVert F^\top p\rVert^2 + c^\top p
           + \sum_{i\in S}\tfrac{w_i}{2}\lVert A_i^\top p - m_i\rVert^2,
   \qquad \nabla f = FF^\top p + c + A\,(w\circ(A^\top p - m)),\qquad \nabla^2 f = UU^\top,

:math:`U = [F,\ \sqrt{w_i}A_i\ (i\in S)]`, on the hard constraints :math:`Q^\top p = \beta(m)`.
Shared by :mod:`jaxens.solvers.admm` and :mod:`jaxens.solvers.working_set` (their implicit
adjoints are the same KKT system on the returned support).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxens.solvers.projections import column_weights
from jaxens.solvers.support_adjoint import support_adjoint

__all__ = ["qp_grad", "qp_eq", "qp_factor", "qp_attach"]


def qp_grad(p, params):
    """``grad f(p) = F F^T p + c + A (w * (A^T p - m))`` of the ADMM objective (soft ``w``)."""
    problem, c, F, m, rho_s = params
    g = F @ (F.T @ p) + c
    if problem.soft:
        w = column_weights(problem, rho_s, jnp.zeros((), p.dtype))
        g = g + problem.A @ (w * (p @ problem.A - m))
    return g


def qp_eq(params):
    problem, _, _, m, _ = params
    return problem.Q, problem.beta(m)


def qp_factor(params):
    """``U`` with ``U U^T`` the Hessian: ``[F, sqrt(rho_i) A_i for soft i]``."""
    problem, _, F, _, rho_s = params
    if not problem.soft:
        return F
    cols = problem.columns(problem.soft)
    w = column_weights(problem, rho_s, jnp.zeros((), F.dtype))[cols]
    return jnp.concatenate([F, problem.A[:, cols] * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]], axis=1)


qp_attach = support_adjoint(qp_grad, qp_eq, qp_factor)
"""``qp_attach(p, params, free, fixed)``: ``p`` with the implicit adjoint of the QP on its support
(:func:`~jaxens.solvers.support_adjoint.support_adjoint`), ``params = (problem, c, F, m, rho)``."""
