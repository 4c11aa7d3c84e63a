r"""Active-set solution polishing of the ADMM iterates (OSQP's, Stellato et al. 2020, §4.3).

With ``ADMM(polish=True)``: ADMM stops at
residuals :math:`\sim 10^{-5}` (float32) that leave ``p`` accurate to only :math:`\sim 10^{-3}`,
so any change of reduction order (batch size, sharding) moves it by that much.  After the loop
the active set is guessed from the pre-clip value :math:`w = z + u` of the last z-update
(:math:`w_j\le 0`: at 0; :math:`w_j \ge u_j`: at the cap; otherwise free, set :math:`S`), and the
equality-constrained problem on :math:`S` is solved directly: with :math:`b` the fixed values
and :math:`H = UU^\top` (:math:`U = [F,\ A_S\,\mathrm{diag}\sqrt{w}]`),

.. math::

    \begin{bmatrix} U_SU_S^\top & Q_S \\ Q_S^\top & 0 \end{bmatrix}
    \begin{bmatrix} p_S \\ \nu \end{bmatrix} =
    \begin{bmatrix} -g_{0,S} - U_S U^\top b \\ \beta - Q^\top b \end{bmatrix}

(:func:`~jaxens.solvers.support_adjoint.kkt_solve`: ``K + r`` unknowns with ``K <= cap``
gathered rows of ``Q`` and ``U``, equilibrated, regularised to a quasi-definite matrix and
factorised with partial pivoting in an XLA loop (no LAPACK custom call), iterative refinement).  For the LP (:math:`U` empty) at a non-degenerate
vertex :math:`|S| = r` and this is the basic solution :math:`Q_S^\top p_S = \beta'`.  The result
is **accepted only if it is a KKT point** within the ADMM tolerances: :math:`p_S` inside its
box, :math:`\lVert Q^\top p-\beta\rVert_\infty` no larger than the iterate's, and the reduced
cost :math:`d = \nabla f(p) + Q\nu` has :math:`d_j \ge 0` at 0, :math:`d_j\le 0` at the cap,
:math:`d_S = 0` (a certificate of optimality, hence also "objective no worse" than any feasible
point); otherwise up to ``polish_rounds - 1`` active-set corrections are tried (per round the
free token farthest outside its box goes to the bound and, of the bound tokens with a
wrong-signed :math:`d_j`, the one nearest its bound in :math:`w` becomes free).  An
accepted polish sets status ``SOLVED`` (even at the iteration cap) and ``gap`` to the KKT
violation; a rejected one, or one skipped because more than ``cap`` tokens are free (a face of
optima, e.g. the constant cost of all-hard exact logits), returns the ADMM iterate as before.
The outcome is ``state.polish`` (:class:`PolishStatus`).  Static shapes throughout (top-``cap``
indices and 0/1 validity masks), so it ``jit``/``vmap``s and shards.  Cost: three ``v x r``
mat-vecs (``Q^T b``, ``Q^T p``, ``Q nu``) and two ``v x k`` ones per round, a gather of ``cap``
rows, and one ``(cap + r)``-sized factorisation per round (``(cap + r)^3`` flops; a round
after the first only while rejected).


:func:`cg_correction` is the cheaper fallback applied when the active-set polish is not accepted:
a scaled minimum-norm correction of ``z`` onto :math:`Q^\top p = \beta` that keeps its support.

The functions take the ADMM settings object (``solver``: ``tolerances``,
``polish_regularisation``, ``polish_refine``, ``polish_rounds``, ``polish_cap``) and the final
ADMM state (``z``, ``u``).
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxens.solvers.support_adjoint import free_indices, kkt_solve

__all__ = [
    "PolishStatus", "Polished", "not_polished", "cg_correction", "active_set_polish", "polish_qp",
    "polish_ratio", "polish_size", "num_soft_cols",
]


class PolishStatus(enum.IntEnum):
    """Outcome of the active-set polish (``ADMMState.polish``, ``int32``).

    * ``NOT_RUN`` - polishing disabled (``ADMM(polish=False)``) or non-finite input.
    * ``ACCEPTED`` - the polished point passed the KKT check and was returned.
    * ``REJECTED`` - the guessed active set gave a point that failed the check (infeasible, a
      wrong dual sign or non-finite): the ADMM iterate was returned (with the CG correction).
    * ``SKIPPED`` - more free tokens than the cap (``rank + k`` for the QP, ``rank`` for the
      ratio LP): the optimum is not a vertex / low-dimensional face (e.g. the constant cost of
      all-hard exact logits); the ADMM iterate was returned.
    """

    NOT_RUN = 0
    ACCEPTED = 1
    REJECTED = 2
    SKIPPED = 3



def cg_correction(Q, beta, z, iters: int):
    r"""Scaled minimum-norm correction onto :math:`Q^\top p = \beta` keeping the support of ``z``:
    :math:`p = z - z\odot Qy` with :math:`(Q^\top Z Q)\,y = Q^\top z - \beta` (``iters`` CG steps,
    two ``v x r`` mat-vecs each); zero entries stay zero and small corrections keep ``p >= 0``."""
    b = Q.T @ z - beta
    mv = lambda y: Q.T @ (z * (Q @ y))  # noqa: E731
    y, _ = jax.scipy.sparse.linalg.cg(mv, b, maxiter=iters)
    return z - z * (Q @ y)



class Polished(NamedTuple):
    """Result of an active-set polish: the point, its :class:`PolishStatus` and KKT violation."""

    p: Float[Array, " v"]
    status: Int[Array, ""]
    dual_violation: Float[Array, ""]


def not_polished(p, dtype) -> Polished:
    return Polished(p, jnp.asarray(PolishStatus.NOT_RUN, jnp.int32), jnp.zeros((), dtype))



def active_set_polish(solver: Any, Q, beta, lower, upper, free, cap, round_fn, ref_res, dist) -> Polished:
    """Solve on the guessed active set, then up to ``polish_rounds - 1`` active-set corrections,
    one token each way per round as in an active-set method: the free token farthest outside its
    box moves to the violated bound, and of the bound tokens with a wrong-signed reduced cost the
    one ADMM was least sure of (smallest ``dist``, its pre-clip distance to the bound) becomes
    free.  Stops at the first round that passes the KKT check (a
    ``while_loop``: rows accepted at once pay one KKT solve)."""
    dtype = Q.dtype
    n = free.shape[0]
    ta, tr = solver.tolerances(dtype)
    eps_eq = ta + tr * jnp.max(jnp.abs(beta))

    def one(viol):
        return (jnp.arange(n) == jnp.argmax(viol)) & (jnp.max(viol) > 0)

    def body(carry):
        lower, upper, free, best_p, status, viol_out, k = carry
        n_free = jnp.sum(free)
        p, d, below, above, p_clip, d_scale, finite = round_fn(lower, upper, free)
        eps_p = ta + tr * jnp.maximum(jnp.max(jnp.abs(p)), 1e-30)
        eps_d = ta + tr * d_scale
        primal_ok = ~jnp.any(free & ((below < -eps_p) | (above > eps_p)))
        primal_ok &= jnp.max(jnp.abs(Q.T @ p - beta)) <= jnp.maximum(ref_res, eps_eq)
        viol = jnp.max(
            jnp.where(lower, jnp.maximum(-d, 0.0), 0.0)
            + jnp.where(upper, jnp.maximum(d, 0.0), 0.0)
            + jnp.where(free, jnp.abs(d), 0.0)
        )
        ok = finite & primal_ok & (viol <= eps_d) & (n_free <= cap)
        best_p = jnp.where(ok, p_clip, best_p)
        viol_out = jnp.where(ok, viol, viol_out)
        status = jnp.where(
            ok, PolishStatus.ACCEPTED, jnp.where((k == 0) & (n_free > cap), PolishStatus.SKIPPED, PolishStatus.REJECTED)
        ).astype(jnp.int32)
        out_lo = one(jnp.where(free & (below < -eps_p), -below, 0.0))
        out_hi = one(jnp.where(free & (above > eps_p), above, 0.0)) & ~out_lo
        wrong = (lower & (d < -eps_d)) | (upper & (d > eps_d))
        top = jnp.maximum(jnp.max(jnp.where(wrong, dist, 0.0)), 1e-30)
        into = one(jnp.where(wrong, 1.0 / (1.0 + dist / top), 0.0))
        lower = (lower & ~into) | out_lo
        upper = (upper & ~into) | out_hi
        free = (free & ~out_lo & ~out_hi) | into
        return lower, upper, free, best_p, status, viol_out, k + 1

    def cond(carry):
        status, k = carry[4], carry[6]
        more = (k == 0) | ((status == PolishStatus.REJECTED) & (k < max(solver.polish_rounds, 1)))
        return more

    init = (
        lower, upper, free, jnp.zeros((n,), dtype), jnp.asarray(PolishStatus.REJECTED, jnp.int32),
        jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32),
    )
    _, _, _, best_p, status, viol_out, _ = jax.lax.while_loop(cond, body, init)
    return Polished(best_p, status, viol_out.astype(dtype))



def num_soft_cols(problem) -> int:
    return sum(problem.member_cols[i] for i in problem.soft)


def polish_size(solver: Any, q_shape, k: int) -> int:
    """Static size ``cap + r`` of the polish's KKT matrix (shapes only)."""
    v, r = q_shape
    cap = min(2 * (r + k) if solver.polish_cap is None else solver.polish_cap, v)
    return cap + r



def polish_qp(solver: Any, Q, beta, U, g0, mask, box, state: Any) -> Polished:
    r"""Active-set polish of the QP/LP :math:`\min \tfrac12\lVert U^\top p\rVert^2 + g_0^\top p`
    s.t. :math:`Q^\top p = \beta,\ 0\le p\le u` from the last ADMM iterate (module docstring)."""
    dtype = Q.dtype
    r, k = Q.shape[1], U.shape[1]
    cap = min(2 * (r + k) if solver.polish_cap is None else solver.polish_cap, Q.shape[0])
    w = state.z + state.u  # the pre-clip value of the last z-update
    lower = mask & (w <= 0.0)
    upper = mask & ~lower & (w >= box)
    free = mask & ~lower & ~upper

    def round_fn(lower, upper, free):
        b = jnp.where(upper, box, 0.0)
        idx, valid = free_indices(free.astype(dtype), cap)
        x, nu = kkt_solve(
            U[idx], g0[idx] + U[idx] @ (U.T @ b), Q[idx], beta - Q.T @ b, valid,
            solver.polish_regularisation(dtype), solver.polish_refine,
        )
        p = b.at[idx].add(valid * x)
        grad = U @ (U.T @ p) + g0
        Qnu = Q @ nu
        d = grad + Qnu  # reduced cost: >= 0 at 0, <= 0 at the cap, 0 on the free set
        d_scale = jnp.maximum(jnp.max(jnp.abs(jnp.where(mask, grad, 0.0))), jnp.max(jnp.abs(Qnu)))
        finite = jnp.all(jnp.isfinite(p)) & jnp.all(jnp.isfinite(nu))
        p_clip = jnp.where(mask, jnp.clip(p, 0.0, box), 0.0)
        return p, d, p, p - box, p_clip, d_scale, finite

    ref_res = jnp.max(jnp.abs(Q.T @ jnp.clip(state.z, 0.0, box) - beta))
    dist = jnp.where(lower, -w, jnp.where(upper, w - box, 0.0))  # how sure ADMM is of a bound
    return active_set_polish(solver, Q, beta, lower, upper, free, cap, round_fn, ref_res, dist)



RATIO_TIE = 1e-2
# Off: ADMM's final iterate of the min-underestimation LP has more "free" tokens than the vertex
# (r), so the KKT system on its guessed active set is underdetermined in p; finishing needs a
# simplex ratio-test step along the face (a known gap).  The ratio LP returns the ADMM iterate
# (state.polish NOT_RUN).
POLISH_RATIO = False


def polish_ratio(solver: Any, Q, beta, r, kappa, mask, state: Any) -> Polished:
    r"""Active-set polish of the min-underestimation LP (module docstring): with the free set
    :math:`F`, the tokens at the bound :math:`U` and the rest at 0, solve
    :math:`Q_F^\top p_F + s\,Q_U^\top r_U = \beta` with the dual :math:`Q_F\nu = 0`,
    :math:`r_U^\top Q_U\nu = -1` (one KKT system), then check signs."""
    dtype = Q.dtype
    v, rank = Q.shape
    cap = min(2 * rank if solver.polish_cap is None else solver.polish_cap, v)
    a = state.z[:v] + state.u[:v]  # pre-clip p
    s_sc = state.z[v]  # scaled s: the bound is s_sc * r / kappa
    pos = mask & (r > 0)
    lower = mask & ((a <= 0.0) | ~pos)
    # tokens near the bound are at it (ADMM approaches the bound slowly from below)
    upper = pos & ~lower & (a >= (1.0 - RATIO_TIE) * s_sc * r / kappa)
    free = mask & ~lower & ~upper

    def round_fn(lower, upper, free):
        lower = lower | (mask & ~pos)
        upper = upper & pos
        free = free & pos
        idx, valid = free_indices(free.astype(dtype), cap)
        ru = jnp.where(upper, r, 0.0)
        E = jnp.concatenate([Q[idx], (ru @ Q)[None, :]], axis=0)
        g = jnp.zeros((cap + 1,), dtype).at[cap].set(1.0)
        valid1 = jnp.concatenate([valid, jnp.ones((1,), dtype)])
        x, nu = kkt_solve(
            jnp.zeros((cap + 1, 0), dtype), g, E, beta, valid1,
            solver.polish_regularisation(dtype), solver.polish_refine,
        )
        s = x[cap]
        p = (s * ru).at[idx].add(valid * x[:cap])
        d = jnp.where(pos, Q @ nu, 0.0)  # >= 0 at 0, <= 0 at the bound, 0 on the free set
        d_scale = jnp.max(jnp.abs(jnp.where(mask, d, 0.0)))
        finite = jnp.all(jnp.isfinite(p)) & jnp.all(jnp.isfinite(nu)) & (s >= 0)
        p_clip = jnp.where(mask, jnp.clip(p, 0.0, jnp.maximum(s, 0.0) * r), 0.0)
        return p, d, p, p - s * r, p_clip, d_scale, finite

    ref_res = jnp.max(jnp.abs(Q.T @ jnp.where(mask, jnp.maximum(state.z[:v], 0.0), 0.0) - beta))
    dist = jnp.where(lower, -a, jnp.where(upper, a - s_sc * r / kappa, 0.0))
    return active_set_polish(solver, Q, beta, lower, upper, free, cap, round_fn, ref_res, jnp.abs(dist))


