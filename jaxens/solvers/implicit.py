r"""Implicit differentiation of a root :math:`z^\star(\pi)` of an optimality condition.

The dual solvers in :mod:`jaxens.solvers.entropic_newton` and :mod:`jaxens.solvers.cross_entropy_newton` return
the minimiser :math:`z^\star` of a smooth convex dual :math:`\varphi(z;\pi)` whose parameters
:math:`\pi` are the logits :math:`\theta` (or the mixture :math:`s`), the moments :math:`m`,
the soft weights :math:`\rho` and the array leaves of the
:class:`~jaxens.problem.BottleneckProblem` (``A``, ``Q``, ``T_pinv``).  At the optimum

.. math::  F(z^\star(\pi), \pi) = \nabla_z \varphi(z^\star;\pi) = 0,

so by the implicit function theorem
:math:`\partial z^\star/\partial\pi = -H^{-1}\,\partial_\pi F` with
:math:`H = \partial_z F = \nabla^2_z\varphi` (the ``k x k`` Hessian the Newton solver already
forms, ``k = r + D_S``).  Reverse mode therefore needs one ``k x k`` solve
:math:`H\lambda = \bar z` and one VJP of :math:`F` with respect to :math:`\pi` at the solution
(:math:`\bar\pi = -(\partial_\pi F)^\top\lambda`); no iterate is stored.  The distribution
:math:`p^\star = p(z^\star,\pi)` is then formed *outside* the root with ordinary autodiff,
which adds the explicit dependence on :math:`\pi`.

The same pattern as jaxopt's ``custom_root`` (Blondel et al., "Efficient and modular implicit
differentiation", 2022) and optimistix's ``ImplicitAdjoint``, specialised to a symmetric
Hessian supplied by the solver (so that singular directions, e.g. the shift
:math:`z_h \mapsto z_h + t\,Q^\top\mathbf 1` that leaves the softmax unchanged, can be fixed
by the solver that knows them).

Caveat on ``Q`` and ``T_pinv``: the hard constraints include :math:`\mathbf 1^\top p = 1`
only through :math:`\mathbf 1 \in \mathrm{span}\,Q` and :math:`u^\top\beta = 1`
(:math:`Qu = \mathbf 1`).  A generic perturbation of ``Q`` or ``T_pinv`` breaks this and
changes the feasible set discontinuously, so the returned cotangents for those two leaves are
the minimum-norm (pseudo-inverse) ones, meaningful only along perturbations that keep
:math:`\mathbf 1 \in \mathrm{span}\,Q`.  Cotangents for :math:`\theta`, :math:`m`,
:math:`\rho`, ``A`` (soft columns) and ``s`` are exact and tested against finite differences.

The *unrolled* alternative (differentiate through a fixed number of Newton steps run with
``lax.fori_loop``) is a solver setting (``adjoint=UnrolledAdjoint(steps)``, :mod:`jaxens.solvers.adjoint`); the tests check both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxens.problem import BottleneckProblem

__all__ = ["implicit_root", "differentiable_problem"]


def implicit_root(
    forward: Callable[[Any, Any], tuple[Any, Any]],
    residual: Callable[[Any, Any, Any], Any],
    adjoint_solve: Callable[[Any, Any, Any, Any], Any],
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Wrap a root finder so that reverse mode uses the implicit function theorem.

    Args:
      forward: ``forward(params, aux) -> (z, info)``: solves :math:`F(z, params) = 0`.
        ``params`` is the pytree differentiated through; ``aux`` holds non-differentiable
        inputs (masks, warm starts); ``info`` are diagnostics (no gradient flows into them).
      residual: ``residual(z, params, aux) -> F`` (same shape as ``z``): the optimality
        condition, differentiable in ``params``.
      adjoint_solve: ``adjoint_solve(z, params, aux, zbar) -> lam`` solving
        :math:`(\\partial_z F)^\\top \\lambda = \\bar z` at the root.

    Returns:
      ``root(params, aux) -> (z, info)`` with a ``custom_vjp``.
    """

    @jax.custom_vjp
    def root(params, aux):
        return forward(params, aux)

    def fwd(params, aux):
        z, info = forward(params, aux)
        return (z, info), (z, params, aux)

    def bwd(res, cotangents):
        z, params, aux = res
        zbar, _ = cotangents
        lam = adjoint_solve(z, params, aux, zbar)
        _, vjp = jax.vjp(lambda pr: residual(z, pr, aux), params)
        (params_bar,) = vjp(jax.tree.map(lambda x: -x, lam))
        return params_bar, None

    root.defvjp(fwd, bwd)
    return root


def differentiable_problem(problem: BottleneckProblem, A: Float[Array, "v D"]) -> BottleneckProblem:
    r"""``problem`` with ``A`` replaced and ``Q``, ``T_pinv`` re-derived from it *traceably*.

    :func:`~jaxens.problem.make_problem` builds ``Q``/``T_pinv`` eagerly in numpy (an eigh with a
    rank decision), so ``jax.grad`` cannot reach the unembeddings through it.  This function is
    the differentiable route for gradients with respect to ``W`` (and biases): build the
    problem once with ``make_problem`` (static structure: member columns, hard/soft sets, rank),
    then, inside the differentiated function, call
    ``differentiable_problem(problem, jnp.concatenate([W_1, b_1, ...], axis=1))``.

    With :math:`C = [A_H,\ \mathbf 1]` of full column rank and the Cholesky factor
    :math:`C^\top C = LL^\top`, :math:`Q = CL^{-\top}` is an orthonormal basis of
    :math:`\mathrm{span}\,C` and :math:`Q^\top p = L^{-1}C^\top p = L^{-1}[m_H; 1]`, i.e.
    ``T_pinv`` :math:`= L^{-1}`; one more Cholesky of :math:`Q^\top Q` re-orthonormalises (the
    Gram route squares the condition number).  Every step is smooth in ``A``, and the basis
    keeps :math:`\mathbf 1 \in \mathrm{span}\,Q` exactly, so the cotangents of ``Q``/``T_pinv``
    from the solvers' adjoints chain into exact cotangents of ``A`` (see the caveat above).
    ``Q`` differs from ``make_problem``'s by a rotation, which changes no solution.  The Lipschitz
    constants are recomputed without gradient (they only set step sizes).

    Raises:
      ValueError: if ``A`` has the wrong shape, or ``[A_H, 1]`` was rank deficient when the
        problem was built (duplicated members): the rank decision is not differentiable.
    """
    if tuple(A.shape) != tuple(problem.A.shape):
        raise ValueError(f"A must have the problem's shape {tuple(problem.A.shape)}, got {tuple(A.shape)}")
    hard_cols = problem.columns(problem.hard)
    if problem.rank != hard_cols.size + 1:
        raise ValueError(
            f"[A_H, 1] has rank {problem.rank} < {hard_cols.size + 1} columns (duplicated or "
            "rank-deficient hard members): Q is not a differentiable function of A there; "
            "drop the duplicated member from the hard set"
        )
    A = jnp.asarray(A, problem.A.dtype)
    C = jnp.concatenate([A[:, hard_cols], jnp.ones((A.shape[0], 1), A.dtype)], axis=1)
    L = jnp.linalg.cholesky(C.T @ C)
    Q = jax.scipy.linalg.solve_triangular(L, C.T, lower=True).T
    L2 = jnp.linalg.cholesky(Q.T @ Q)
    Q = jax.scipy.linalg.solve_triangular(L2, Q.T, lower=True).T
    eye = jnp.eye(C.shape[1], dtype=A.dtype)
    # beta = L2^{-1} L^{-1} [m_H; 1]
    T_pinv = jax.scipy.linalg.solve_triangular(L2, jax.scipy.linalg.solve_triangular(L, eye, lower=True), lower=True)
    An = jax.lax.stop_gradient(A)
    lip_h = jnp.linalg.eigvalsh(An[:, hard_cols].T @ An[:, hard_cols])[-1] if hard_cols.size else jnp.zeros((), A.dtype)
    starts = np.cumsum((0,) + problem.member_cols)
    lip_m = jnp.stack([jnp.linalg.eigvalsh(An[:, a:b].T @ An[:, a:b])[-1] for a, b in zip(starts[:-1], starts[1:])])
    return problem.with_A(A, Q=Q, T_pinv=T_pinv, lipschitz_hard=lip_h, lipschitz_members=lip_m)
