r"""Implicit differentiation of a root :math:`z^\star(\pi)` of an optimality condition.

The dual solvers in :mod:`jaxens.solvers.newton` and :mod:`jaxens.solvers.reverse_ce` return
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
``lax.fori_loop``) is a solver setting (``adjoint="unrolled"``); the tests check both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["implicit_root"]


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
