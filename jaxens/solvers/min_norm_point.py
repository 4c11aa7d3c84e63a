r"""Wolfe's minimum-norm-point algorithm with block pricing: the least-squares phase at full vocabulary.

**Problem** (one row): with the points :math:`P_j = a_j - m_H` (:math:`a_j` the ``j``-th row of
:math:`A_H`, ``j`` allowed by the mask),

.. math::  \min_{p\in\Delta_v}\ \tfrac12\lVert A_H^\top p - m_H\rVert^2
           = \min_{x\in\mathrm{conv}\{P_j\}}\ \tfrac12\lVert x\rVert^2 ,

the least-squares relaxation of the hard constraints (:mod:`jaxens.solvers.least_squares`).
Its minimiser has at most ``D_H + 1`` positive tokens (Carathéodory), where an interior point or
a first-order method on the whole vocabulary spends ``v``-length work on tokens that end at 0.

**Method** (Wolfe 1976).  Keep a *corral* ``S`` of affinely independent points with weights
:math:`\lambda > 0`, :math:`x = \sum_{i\in S}\lambda_i P_i`:

* *major cycle*: the most improving point :math:`j^\star = \arg\min_j P_j^\top x`; stop when
  :math:`x^\top x - P_{j^\star}^\top x \le \mathrm{tol}\cdot x^\top x` (the Frank-Wolfe gap);
  otherwise add it to ``S``;
* *minor cycle*: the affine minimum-norm point :math:`y = P_S\alpha` of ``S``
  (:math:`\alpha = K^{-1}\mathbf 1 / \mathbf 1^\top K^{-1}\mathbf 1`,
  :math:`K = M\mathbf 1\mathbf 1^\top + P_S^\top P_S`, whose Cholesky factor is updated by one
  column when a point enters and by Givens rotations when one leaves: :math:`O(|S|^2)` per step);
  if :math:`\alpha > 0` take it, else move from :math:`\lambda` towards :math:`\alpha` until a
  weight reaches 0, drop that point, repeat.

*Block pricing*: a full pass over :math:`A_H` (:math:`v D_H`, the only ``v``-length work) prices
every token and keeps the ``block`` most improving ones; major cycles then price only that block
(:math:`\text{block}\cdot D_H`) until none of it improves, and the next full pass checks the whole
vocabulary (the stopping test above is always made on a full pass).

**Certificates** come for free: with :math:`d = -x/\lVert x\rVert` the Farkas margin is
:math:`\min_j P_j^\top x/\lVert x\rVert` (positive: no distribution meets the hard moments), and
:math:`\lVert x\rVert \le` ``feas_tol`` says the constraints hold to tolerance.  At the optimum the
margin equals :math:`\lVert x\rVert` (minimax duality).

Rounding: ``x`` is recomputed from the corral (:math:`P_S^\top\lambda`), not from the factor;
an entering point whose pivot :math:`\rho^2` is below ``sqrt(eps)`` of its diagonal is taken as
affinely dependent and not added (the block moves on).

Batches: the algorithm is control-heavy (nested loops, data-dependent lengths); under ``vmap``
every loop runs as long as its slowest row at every level, so map rows sequentially
(``jax.lax.map``) on CPUs, as the bottleneck combiner does.  No gradient: the least-squares phase's
verdict is piecewise constant; differentiate the ``least_squares`` objective (FISTA) instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = ["MinNormPoint", "MNPResult", "min_norm_point"]


@dataclasses.dataclass(frozen=True)
class MinNormPoint:
    """Settings of :func:`min_norm_point` (the least-squares phase without caps).

    Attributes:
      tol: relative Frank-Wolfe gap :math:`(x^\\top x - \\min_j P_j^\\top x)/x^\\top x` for
        convergence, a bound on the relative excess of :math:`\\lVert x\\rVert^2` over its minimum
        (``None``: ``5e-3`` in float32, ``1e-8`` in float64).  float32 cannot go much lower on real
        rows: an improving point's distance from the corral's affine hull is then below the
        rounding of the Gram factor (points of norm ~8, distances ~1e-4 at gap 5e-3).
      differentiable: attach the gradient of the least-squares optimum on the returned support
        (:func:`support_gradient`; ``O(|S|^3)`` more per row); otherwise ``p`` carries none.
      block: tokens kept per full pricing pass.
      max_passes: the most full passes over :math:`A_H`.
      max_majors: the most major cycles (points added) in all.
    """

    tol: float | None = None
    differentiable: bool = False
    block: int = 64
    max_passes: int = 50
    max_majors: int = 4000

    def __post_init__(self):
        if self.block < 1 or self.max_passes < 1 or self.max_majors < 1:
            raise ValueError(f"Expected block, max_passes, max_majors >= 1, got "
                             f"{self.block}, {self.max_passes}, {self.max_majors}")

    def tolerance(self, dtype) -> float:
        return self.tol if self.tol is not None else (1e-8 if jnp.finfo(dtype).bits >= 64 else 5e-3)


class MNPResult(NamedTuple):
    """``p`` (the weights on the vocabulary), ``x = A_H^T p - m_H``, the relative Frank-Wolfe
    gap at the last full pass, ``min_j P_j^T x`` there, and the work done."""

    p: Float[Array, " v"]
    x: Float[Array, " D"]
    support: Int[Array, " S"]  # corral token ids, -1 past its size
    gap: Float[Array, ""]
    min_score: Float[Array, ""]
    converged: Bool[Array, ""]
    passes: Int[Array, ""]
    majors: Int[Array, ""]


class _State(NamedTuple):
    idx: Array  # (S,) corral token ids (first s valid)
    lam: Array  # (S,) weights
    PS: Array  # (S, D) corral points
    R: Array  # (S, S) upper triangular, R^T R = M 11^T + PS PS^T on the first s (identity padding)
    s: Array
    x: Array  # (D,)
    majors: Array


def _affine(R, s):
    """``alpha``: the affine minimum-norm weights of the corral (zeros past ``s``)."""
    S = R.shape[0]
    ones = (jnp.arange(S) < s).astype(R.dtype)
    u = jax.scipy.linalg.solve_triangular(R, ones, trans="T", lower=False)
    a = jax.scipy.linalg.solve_triangular(R, u, lower=False)
    return a / jnp.sum(a)


def _delete(st: _State, i) -> _State:
    """Drop corral position ``i``: shift it out and restore the factor with Givens rotations."""
    S = st.R.shape[0]
    ar = jnp.arange(S)
    src = jnp.where(ar >= i, jnp.minimum(ar + 1, S - 1), ar)
    idx, lam, PS = st.idx[src], st.lam[src], st.PS[src]
    R = st.R[:, src]  # upper Hessenberg from column i on

    def rot(k, R):
        zero = jnp.zeros_like(k)
        rows = jax.lax.dynamic_slice(R, (k, zero), (2, S))  # rows k, k+1 only: updated in place
        a = jax.lax.dynamic_index_in_dim(rows[0], k, keepdims=False)
        b = jax.lax.dynamic_index_in_dim(rows[1], k, keepdims=False)
        h = jnp.hypot(a, b)
        safe = h > 0
        c = jnp.where(safe, a / jnp.where(safe, h, 1.0), 1.0)
        sn = jnp.where(safe, b / jnp.where(safe, h, 1.0), 0.0)
        new = jnp.stack([c * rows[0] + sn * rows[1], -sn * rows[0] + c * rows[1]])
        return jax.lax.dynamic_update_slice(R, new, (k, zero))

    s = st.s - 1
    R = jax.lax.fori_loop(jnp.asarray(i, jnp.int32), s.astype(jnp.int32), rot, R)
    valid = ar < s
    R = jnp.where(valid[:, None] & valid[None, :], R, jnp.eye(S, dtype=R.dtype))
    lam = jnp.where(valid, lam, 0.0)
    return st._replace(idx=jnp.where(valid, idx, -1), lam=lam, PS=jnp.where(valid[:, None], PS, 0.0), R=R, s=s)


def _minor(st: _State, eps) -> _State:
    """Minor cycles until the affine minimum-norm point lies inside the corral's hull."""

    def cond(c):
        st, done = c
        return ~done & (st.s > 0)

    def body(c):
        st, _ = c
        S = st.R.shape[0]
        valid = jnp.arange(S) < st.s
        a = _affine(st.R, st.s)
        inside = jnp.all(jnp.where(valid, a > eps, True))

        def take(st):
            lam = jnp.where(valid, a, 0.0)
            lam = lam / jnp.sum(lam)
            return st._replace(lam=lam, x=st.PS.T @ lam)

        def shrink(st):
            # step from lam towards a until the first weight reaches 0, and drop that point
            neg = valid & (a <= eps)
            ratio = jnp.where(neg, st.lam / jnp.where(neg, st.lam - a, 1.0), jnp.inf)
            theta = jnp.clip(jnp.min(ratio), 0.0, 1.0)
            out_i = jnp.argmin(ratio)
            lam = jnp.where(valid, st.lam + theta * (a - st.lam), 0.0).at[out_i].set(0.0)
            moved = _delete(st._replace(lam=lam), out_i)
            lam = moved.lam / jnp.sum(moved.lam)
            return moved._replace(lam=lam, x=moved.PS.T @ lam)

        return jax.lax.cond(inside, take, shrink, st), inside

    st, _ = jax.lax.while_loop(cond, body, (st, jnp.zeros((), bool)))
    return st


def _append(st: _State, j, q, M, pivot_tol):
    """Add point ``q`` (token ``j``) to the corral; ``(state, added)`` (not added when affinely
    dependent on the corral to rounding)."""
    S = st.R.shape[0]
    ar = jnp.arange(S)
    valid = ar < st.s
    k = jnp.where(valid, M + st.PS @ q, 0.0)
    r = jax.scipy.linalg.solve_triangular(st.R, k, trans="T", lower=False)
    r = jnp.where(valid, r, 0.0)
    kappa = M + q @ q
    rho2 = kappa - r @ r
    ok = (rho2 > pivot_tol * kappa) & (st.s < S)

    def add(st):
        col = jnp.where(valid, r, jnp.where(ar == st.s, jnp.sqrt(jnp.maximum(rho2, 0.0)), st.R[:, st.s]))
        return st._replace(
            idx=st.idx.at[st.s].set(j),
            lam=st.lam.at[st.s].set(0.0),
            PS=st.PS.at[st.s].set(q),
            R=st.R.at[:, st.s].set(col),
            s=st.s + 1,
            majors=st.majors + 1,
        )

    return jax.lax.cond(ok, add, lambda st: st, st), ok


@functools.partial(jax.jit, static_argnames=("settings",))
def min_norm_point(
    G: Float[Array, "v D"],
    m: Float[Array, " D"],
    mask: Bool[Array, " v"],
    settings: MinNormPoint = MinNormPoint(),
    feas_tol: Float[Array, ""] | float = 0.0,
) -> MNPResult:
    r"""Minimum-norm point of :math:`\mathrm{conv}\{G_j - m : \mathrm{mask}_j\}` for one row (``vmap``
    for a batch); see the module docstring.  Stops at a relative Frank-Wolfe gap of
    ``settings.tol`` or when :math:`\lVert x\rVert \le` ``feas_tol`` (feasible to tolerance)."""
    v, D = G.shape
    dtype = G.dtype
    m = jnp.asarray(m, dtype)
    S = min(D + 2, v)
    tol = settings.tolerance(dtype)
    b = min(settings.block, v)
    eps = jnp.finfo(dtype).eps
    pivot_tol = jnp.sqrt(eps)
    lam_eps = 10.0 * eps

    def points(j):
        return G[j] - m

    # first point: the nearest one to the origin (one pass)
    norms = jnp.sum(G * G, axis=1) - 2.0 * (G @ m) + m @ m
    j0 = jnp.argmin(jnp.where(mask, norms, jnp.inf))
    q0 = points(j0)
    M = jnp.max(jnp.where(mask, norms, 0.0))  # Wolfe's constant: about the largest ||P_j||^2
    M = jnp.where(jnp.isfinite(M) & (M > 0), M, 1.0)
    R0 = jnp.eye(S, dtype=dtype).at[0, 0].set(jnp.sqrt(M + q0 @ q0))
    st = _State(
        idx=jnp.full((S,), -1, jnp.int32).at[0].set(j0.astype(jnp.int32)),
        lam=jnp.zeros((S,), dtype).at[0].set(1.0),
        PS=jnp.zeros((S, D), dtype).at[0].set(q0),
        R=R0,
        s=jnp.ones((), jnp.int32),
        x=q0,
        majors=jnp.ones((), jnp.int32),
    )

    def full_price(x):
        sc = jnp.where(mask, G @ x - m @ x, jnp.inf)
        return sc

    def pass_body(carry):
        st, _, _, passes, _ = carry
        xx = st.x @ st.x
        sc = full_price(st.x)
        # block: the most improving tokens
        in_s = jnp.zeros((v,), bool).at[jnp.where(st.idx >= 0, st.idx, v)].set(True, mode="drop")
        _, blk = jax.lax.top_k(-jnp.where(in_s, jnp.inf, sc), b)
        PB = G[blk] - m[None, :]  # (b, D)
        tried = ~mask[blk] | in_s[blk]

        def maj_cond(c):
            st, tried, stop = c
            return ~stop & (st.majors < settings.max_majors)

        def maj_body(c):
            st, tried, _ = c
            xx = st.x @ st.x
            sb = jnp.where(tried, jnp.inf, PB @ st.x)
            t = jnp.argmin(sb)
            improving = (xx - sb[t] > tol * xx) & (jnp.sqrt(xx) > feas_tol)

            def step(st):
                st, added = _append(st, blk[t], PB[t], M, pivot_tol)
                return jax.lax.cond(added, lambda s_: _minor(s_, lam_eps), lambda s_: s_, st)

            st = jax.lax.cond(improving, step, lambda s_: s_, st)
            tried = tried.at[t].set(True)
            return st, tried, ~improving

        st, _, _ = jax.lax.while_loop(maj_cond, maj_body, (st, tried, jnp.zeros((), bool)))
        xx = st.x @ st.x
        sc = full_price(st.x)
        ms = jnp.min(sc)
        gap = (xx - ms) / jnp.maximum(xx, jnp.finfo(dtype).tiny)
        # a pass that adds no point cannot improve (the block's points are dependent to rounding)
        stalled = st.majors == carry[0].majors
        done = (gap <= tol) | (jnp.sqrt(xx) <= feas_tol) | (st.majors >= settings.max_majors) | stalled
        return st, gap, ms, passes + 1, done | ~jnp.isfinite(xx)

    inf = jnp.asarray(jnp.inf, dtype)
    init = (st, inf, -inf, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    st, gap, ms, passes, _ = jax.lax.while_loop(
        lambda c: ~c[4] & (c[3] < settings.max_passes), pass_body, init
    )
    valid = jnp.arange(S) < st.s
    p = jnp.zeros((v,), dtype).at[jnp.where(valid, st.idx, v)].add(jnp.where(valid, st.lam, 0.0), mode="drop")
    xx = st.x @ st.x
    converged = (gap <= tol) | (jnp.sqrt(xx) <= feas_tol)
    return MNPResult(p=p, x=st.x, support=jnp.where(valid, st.idx, -1), gap=gap, min_score=ms,
                     converged=converged, passes=passes, majors=st.majors)


def support_gradient(G, m, p, idx, valid):
    r"""``p`` forward; backward, the derivative of the least-squares optimum on its support ``S``
    (``idx[valid]``): with :math:`P_S = G_S - m` (rows), the weights minimise
    :math:`\lVert P_S^\top\lambda\rVert^2` subject to :math:`\mathbf 1^\top\lambda = 1`, so

    .. math::  \lambda = K^{-1}\mathbf 1 / \mathbf 1^\top K^{-1}\mathbf 1, \qquad
               K = P_S P_S^\top + \mu\mathbf 1\mathbf 1^\top

    (any :math:`\mu > 0`), differentiated by autodiff through one dense solve.  Valid where the
    support is stable and its points affinely independent (an infeasible row's optimum, which is
    unique); a feasible row's optimum is a face and has no derivative."""
    S = idx.shape[0]
    PS = jnp.where(valid[:, None], G[jnp.where(valid, idx, 0)] - m[None, :], 0.0)
    ones = valid.astype(G.dtype)
    K = PS @ PS.T
    mu = jax.lax.stop_gradient(jnp.max(jnp.diag(K)) + 1.0)
    K = K + mu * ones[:, None] * ones[None, :]
    K = jnp.where(valid[:, None] & valid[None, :], K, jnp.eye(S, dtype=K.dtype))
    a = jnp.linalg.solve(K, ones)
    lam = a / jnp.sum(a)
    pd = jnp.zeros_like(p).at[jnp.where(valid, idx, p.shape[0])].add(jnp.where(valid, lam, 0.0), mode="drop")
    return jax.lax.stop_gradient(p) + pd - jax.lax.stop_gradient(pd)
