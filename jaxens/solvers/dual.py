r"""The dual set-up and Hessian helpers shared by the two Newton solvers.

Both :mod:`jaxens.solvers.entropic_newton` and :mod:`jaxens.solvers.cross_entropy_newton`
dualise the hard constraints :math:`Q^\top p = \beta` (``problem.beta(m)``, which includes
:math:`\mathbf 1^\top p = 1`) and the soft penalties
:math:`\tfrac{\rho_i}2\lVert A_i^\top p - m_i\rVert^2` (by conjugacy,
:math:`\tfrac\rho2\lVert w\rVert^2 = \max_u u^\top w - \lVert u\rVert^2/(2\rho)`) into one dual
vector of size :math:`k = r + D_S` with

.. math::  G = [Q,\ A_S] \in \mathbb R^{v\times k},\qquad b = (\beta,\ m_S),\qquad
           R^{-1} = \mathrm{blockdiag}(0,\ I/\rho_i)

(:func:`dual_blocks`).  Their Newton systems are weighted Gram matrices
:math:`G^\top\mathrm{diag}(w)\,G + R^{-1}` (:func:`gram`), solved by Cholesky (:func:`chol_solve`);
:func:`entropic_hessian` is the entropic dual's :math:`G^\top(\mathrm{diag}\,p - pp^\top)G + R^{-1}`
and its top-``K`` under-estimate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.projections import uniform_on

__all__ = [
    "NewtonInfo", "soft_cols_rho", "num_dual", "dual_blocks", "gram", "chol_solve", "top_tokens",
    "entropic_hessian", "uniform_fallback",
]


class NewtonInfo(NamedTuple):
    """Diagnostics of one Newton solve (no gradient flows through them)."""

    status: Int[Array, ""]
    gnorm: Float[Array, ""]
    iterations: Int[Array, ""]


def soft_cols_rho(problem: BottleneckProblem, rho: Float[Array, " n"]) -> Float[Array, " Ds"]:
    """:math:`\\rho_i` repeated over the columns of each soft member ``i`` (``(D_S,)``)."""
    parts = [jnp.full((problem.member_cols[i],), rho[i]) for i in problem.soft]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), rho.dtype)


def num_dual(problem: BottleneckProblem) -> int:
    """The dual size :math:`k = r + D_S`."""
    return problem.rank + int(sum(problem.member_cols[i] for i in problem.soft))


def dual_blocks(problem: BottleneckProblem, m: Float[Array, " D"], rho: Float[Array, " n"]):
    """``(G, b, rinv)``: :math:`G = [Q, A_S]`, :math:`b = (\\beta(m), m_S)`, ``rinv`` the diagonal of
    :math:`R^{-1}` (0 on the hard coordinates, :math:`1/\\rho_i` on the soft ones)."""
    dtype = problem.Q.dtype
    if problem.soft:
        G = jnp.concatenate([problem.Q, problem.A_of(problem.soft)], axis=1)
        rho_c = soft_cols_rho(problem, rho).astype(dtype)
        rinv = jnp.concatenate([jnp.zeros((problem.rank,), dtype), 1.0 / rho_c])
        b = jnp.concatenate([problem.beta(m), m[problem.columns(problem.soft)].astype(dtype)])
    else:
        G, rinv, b = problem.Q, jnp.zeros((problem.rank,), dtype), problem.beta(m)
    return G, b.astype(dtype), rinv


def gram(G, w) -> Float[Array, "k k"]:
    """``G^T diag(w) G`` (``dot_general`` contracting the token axis)."""
    return lax.dot_general(G * w[:, None], G, (((0,), (0,)), ((), ())))


def chol_solve(L, b) -> Float[Array, " k"]:
    """Solve ``L L^T x = b`` (as a one-column matrix right-hand side)."""
    y = jax.scipy.linalg.solve_triangular(L, b[:, None], lower=True)
    return jax.scipy.linalg.solve_triangular(L.T, y, lower=False)[:, 0]


def top_tokens(p, topk: int | None, v: int):
    """Indices of the ``topk`` tokens of largest mass (``None`` when the Hessian uses all)."""
    if topk is None or topk >= v:
        return None
    return lax.top_k(p, topk)[1]


def entropic_hessian(G, rinv, p, topk: int | None, idx=None, pG=None) -> Float[Array, "k k"]:
    r"""``G^T(diag p - p p^T)G + R^{-1}``, from the tokens ``idx`` only when given (or the
    ``topk`` of largest mass): on a subset ``K`` with mass ``s`` it is
    :math:`s(\mathrm{Cov}_q(g) + (1-s)\mu\mu^\top) \succeq 0` (``q = p_K/s``), a PSD
    under-estimate, so the Newton step stays a descent direction.

    With ``pG`` :math:`= G^\top p` over all tokens (the gradient's own product) the tail
    :math:`T` outside ``K`` enters through its mean :math:`\mu_T = G^\top p - G_K^\top p_K`:

    .. math::  H_K = G_K^\top \mathrm{diag}(p_K) G_K + \mu_T\mu_T^\top / s_T - (G^\top p)(G^\top p)^\top,

    the covariance of ``p`` with the tail collapsed to one point: PSD, below the exact Hessian
    by :math:`\sum_T p_j g_j g_j^\top - \mu_T\mu_T^\top/s_T \succeq 0` (Cauchy-Schwarz), exact
    when the tail is one token."""
    pk = p
    if idx is None:
        idx = top_tokens(p, topk, G.shape[0])
    if idx is not None:
        G, pk = G[idx], p[idx]
    Gp = pk @ G
    H = gram(G, pk) + jnp.diag(rinv)
    if idx is None or pG is None:  # all tokens, or the plain top-k form
        return H - jnp.outer(Gp, Gp)
    tiny = jnp.finfo(p.dtype).tiny
    s_tail = jnp.maximum(jnp.sum(p) - jnp.sum(pk), 0.0)
    mu = pG - Gp
    tail = jnp.where(s_tail > 1e3 * tiny, 1.0 / jnp.maximum(s_tail, tiny), 0.0)
    return H + tail * jnp.outer(mu, mu) - jnp.outer(pG, pG)


def uniform_fallback(mask: Bool[Array, " v"], dtype) -> Float[Array, " v"]:
    """:func:`~jaxens.solvers.projections.uniform_on` the mask, or on every token when the mask is empty."""
    return uniform_on(jnp.where(jnp.any(mask), mask, True), dtype)
