r"""The OSQP-style ADMM iteration shared by the QP/LP (:mod:`jaxens.solvers.admm`) and the
min-underestimation LP (:mod:`jaxens.solvers.admm_ratio`).

**Splitting** (Boyd et al., "Distributed optimization ... ADMM", 2011, §5; the residuals,
over-relaxation and adaptive :math:`\rho` of OSQP, Stellato et al., Math. Prog. Comp. 2020): copy
:math:`x = z` with :math:`x` on the affine set and :math:`z` in the box, scaled dual :math:`u`:

.. math::

    x^{k+1} &= \arg\min_{Q^\top x=\beta}\ q(x) + \tfrac{\rho}{2}\lVert x - z^k + u^k\rVert^2, \\
    \hat x &= \alpha x^{k+1} + (1-\alpha) z^k, \quad
    z^{k+1} = \mathrm{clip}(\hat x + u^k, 0, u), \quad u^{k+1} = u^k + \hat x - z^{k+1}.

The x-update: with :math:`P = I - QQ^\top`, :math:`G = PF` (``v x k``, once per row) and the
eigendecomposition :math:`G^\top G = V\Lambda V^\top` (``k x k``), the minimiser of
:math:`\tfrac12\lVert F^\top x\rVert^2 + \tfrac{\rho'}{2}\lVert x - w\rVert^2` on the affine set is
:math:`x = Q\beta + (\rho' I + GG^\top)^{-1}P(\rho' w - FF^\top Q\beta)`, with the Woodbury form
:math:`(\rho' I + GG^\top)^{-1} = \rho'^{-1}(I - GV(\rho' I+\Lambda)^{-1}V^\top G^\top)`: no
refactorisation when :math:`\rho` adapts.  Without ``F`` it is the projection
:math:`x = w - Q(Q^\top w - \beta)` (two ``v x r`` mat-vecs).

Soft members are **linearised** (proximal-linearised ADMM): their penalty is replaced by its
gradient at :math:`x^k` plus :math:`\tfrac{L_S}{2}\lVert x - x^k\rVert^2`,
:math:`L_S = \sum_{i\in S}\rho_i\lambda_{\max}(A_i^\top A_i)`; the x-update above is then used
with :math:`\rho' = \rho + L_S`.  No per-row ``v x D_S`` matrix is ever formed (one pair of
mat-vecs with the shared ``A`` per iteration).

Termination (OSQP): primal residual :math:`\lVert x - z\rVert_\infty \le \epsilon_{abs} +
\epsilon_{rel}\max(\lVert x\rVert_\infty, \lVert z\rVert_\infty)` and dual residual
:math:`\lVert \rho(z^{k+1}-z^k) + L_S(x^{k+1}-x^k)\rVert_\infty \le \epsilon_{abs} +
\epsilon_{rel}\max(\lVert\nabla q\rVert_\infty, \lVert\rho u\rVert_\infty)`, checked every
``check_every`` iterations, where :math:`\rho` is also rescaled by
:math:`\sqrt{(r_{prim}/\max(\lVert x\rVert,\lVert z\rVert)) / (r_{dual}/\max(\lVert\nabla q\rVert,
\lVert\rho u\rVert))}` when that ratio leaves ``[1/5, 5]``.  The returned ``p`` is ``z``
renormalised (a distribution); ``Solution.gap`` is the dual residual.  An infeasible row never
converges (status ``MAX_ITERS``, large primal residual): decide feasibility first with
:func:`jaxens.solvers.least_squares.least_squares`.


Each problem supplies its updates as :class:`SplittingOps` (``x_update(z, u, rho, x_prev)``,
``z_update(w, rho)``, ``grad_norm(x)``, ``L_extra``); :func:`admm_step` is one outer iteration
(``check_every`` inner steps, the residual check and the :math:`\rho` update), run to
tolerance or cap by :func:`jaxens.solvers.base.iterate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxens.solvers.polish import PolishStatus, Polished, cg_correction, not_polished
from jaxens.solvers.projections import uniform_on
from jaxens.solvers.solution import Solution, Status

__all__ = [
    "ADMMState", "SplittingOps", "admm_step", "initial_state", "warm_state", "finish", "unrolled_tail",
    "normalise", "straight_through",
]


class ADMMState(NamedTuple):
    """ADMM iterates for one row.  For a :class:`~jaxens.solvers.instances.RatioProgram` the vectors have length
    ``v + 1`` (the last entry is the scaled ``s``).  ``polish`` is a
    :class:`~jaxens.solvers.polish.PolishStatus`."""

    x: Float[Array, " n"]
    z: Float[Array, " n"]
    u: Float[Array, " n"]  # scaled dual (y = rho * u)
    rho: Float[Array, ""]
    iterations: Int[Array, ""]
    primal_residual: Float[Array, ""]
    dual_residual: Float[Array, ""]
    converged: Bool[Array, ""]
    polish: Int[Array, ""]



class SplittingOps(NamedTuple):
    """The row's updates of the splitting (closures over the row's stopped data)."""

    x_update: Callable  # (z, u, rho, x_prev) -> x
    z_update: Callable  # (w, rho) -> z
    grad_norm: Callable  # x -> ||grad q(x)||_inf (the dual tolerance's scale)
    L_extra: Float[Array, ""]  # L_S of the linearised soft penalty (0 without soft members)


def initial_state(x, z, u, rho) -> "ADMMState":
    """The loop's start: residuals ``inf``, not converged, polish ``NOT_RUN``."""
    dtype = x.dtype
    inf = jnp.asarray(jnp.inf, dtype)
    return ADMMState(
        x, z, u, jnp.asarray(rho, dtype), jnp.zeros((), jnp.int32), inf, inf, jnp.zeros((), bool),
        jnp.asarray(PolishStatus.NOT_RUN, jnp.int32),
    )


def admm_step(solver: Any, ops: SplittingOps, s: "ADMMState") -> "ADMMState":
    """``check_every`` ADMM iterations, then the OSQP residual check and the adaptive
    :math:`\rho` update (``solver``: the ADMM settings)."""
    dtype = s.x.dtype
    a = solver.alpha
    x_update, z_update, grad_norm, L_extra = ops

    def one(carry, _):
        x, z, u, rho, _, _ = carry
        x_new = x_update(z, u, rho, x)
        xh = a * x_new + (1 - a) * z
        z_new = z_update(xh + u, rho)
        u_new = u + xh - z_new
        return (x_new, z_new, u_new, rho, z, x), None

    def residuals(x, z, u, rho, z_prev, x_prev):
        prim = jnp.max(jnp.abs(x - z))
        dual = jnp.max(jnp.abs(rho * (z - z_prev) + L_extra * (x - x_prev)))
        xz = jnp.maximum(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(z)))
        yq = jnp.maximum(grad_norm(x), jnp.max(jnp.abs(rho * u)))
        tol_abs, tol_rel = solver.tolerances(xz.dtype)
        eps_p = tol_abs + tol_rel * xz
        eps_d = tol_abs + tol_rel * yq
        return prim, dual, xz, yq, (prim <= eps_p) & (dual <= eps_d)

    carry = (s.x, s.z, s.u, s.rho, s.z, s.x)
    carry, _ = jax.lax.scan(one, carry, None, length=solver.check_every)
    x, z, u, rho, z_prev, x_prev = carry
    prim, dual, xz, yq, conv = residuals(x, z, u, rho, z_prev, x_prev)
    if solver.adaptive_rho:
        floor = jnp.asarray(1e-10, dtype)
        pn = jnp.maximum(prim / jnp.maximum(xz, floor), floor)
        dn = jnp.maximum(dual / jnp.maximum(yq, floor), floor)
        ratio = jnp.sqrt(pn / dn)
        ratio = jnp.where(jnp.isfinite(ratio), ratio, 1.0)
        change = (~conv) & ((ratio > 5.0) | (ratio < 0.2))
        rho_new = jnp.where(change, jnp.clip(rho * ratio, 1e-6, solver.rho_max), rho)
        u = u * (rho / rho_new)
        rho = rho_new
    new = ADMMState(x, z, u, rho, s.iterations + solver.check_every, prim, dual, conv, s.polish)
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(z)) & jnp.all(jnp.isfinite(u))
    bad = s._replace(primal_residual=jnp.asarray(jnp.nan, dtype))
    return jax.tree.map(lambda n_, b_: jnp.where(finite, n_, b_), new, bad)


def warm_state(warm, dtype, default):
    """``(x, z, u, rho or None)`` from a warm start: ``None`` (cold: ``default``), a previous
    :class:`ADMMState` (dual and :math:`\rho` included) or a vector ``p``."""
    if warm is None:
        return default, default, jnp.zeros_like(default), None
    if isinstance(warm, ADMMState):
        if warm.x.shape != default.shape:
            raise ValueError(f"warm-start state has vectors of shape {warm.x.shape}, expected {default.shape}")
        return warm.x.astype(dtype), warm.z.astype(dtype), warm.u.astype(dtype), warm.rho.astype(dtype)
    warm = jnp.asarray(warm, dtype)
    if warm.shape != default.shape:
        raise ValueError(f"warm must be an ADMMState or a vector of shape {default.shape}, got {warm.shape}")
    return warm, warm, jnp.zeros_like(warm), None


def finish(problem, state, loop_status, mask, m, finite_in, p_raw, dtype, polish_iters=0, Q=None, beta=None,
           polished: Polished | None = None):
    """The :class:`~jaxens.solvers.solution.Solution` of the final state: ``p_raw`` clipped, the
    CG correction (``polish_iters``) or an accepted active-set polish, renormalised; status
    ``SOLVED`` when the loop converged or the polish was accepted."""
    p_raw = jnp.where(mask, jnp.maximum(p_raw, 0.0), 0.0)
    if polish_iters:
        p_pol = jnp.where(mask, jnp.maximum(cg_correction(Q, beta, p_raw, polish_iters), 0.0), 0.0)
        res = lambda p: jnp.max(jnp.abs(Q.T @ p - beta))  # noqa: E731
        better = jnp.all(jnp.isfinite(p_pol)) & (res(p_pol) < res(p_raw))
        p_raw = jnp.where(better, p_pol, p_raw)
    if polished is None:
        polished = not_polished(p_raw, dtype)
    accepted = polished.status == PolishStatus.ACCEPTED
    p_raw = jnp.where(accepted, polished.p, p_raw)
    tot = jnp.sum(p_raw)
    p = jnp.where(tot > 0, p_raw / jnp.where(tot > 0, tot, 1.0), uniform_on(mask, dtype))
    # an accepted polish is a KKT point within the tolerances: solved, whatever the loop reached
    status = jnp.where(accepted, Status.SOLVED, loop_status)
    status = jnp.where(finite_in, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    p = jnp.where(finite_in, p, uniform_on(mask, dtype))
    gap = jnp.where(accepted, polished.dual_violation, state.dual_residual)
    sol = Solution(
        p=p,
        status=status,
        primal_residual=problem.hard_residual(p, m),
        gap=jnp.where(finite_in, gap, jnp.inf).astype(dtype),
        iterations=state.iterations,
        certificate=jnp.zeros((problem.A.shape[1],), dtype),
        certificate_margin=jnp.zeros((), dtype),
    )
    pol_status = jnp.where(finite_in, polished.status, PolishStatus.NOT_RUN).astype(jnp.int32)
    return sol, state._replace(polish=pol_status)


def unrolled_tail(solver: Any, x_update, z_update, state: "ADMMState", steps: int):
    """``steps`` differentiable ADMM iterations from the stopped final state (fixed rho)."""
    a = solver.alpha
    st = jax.lax.stop_gradient(state)

    def one(_, carry):
        x, z, u = carry
        x_new = x_update(z, u, st.rho, x)
        xh = a * x_new + (1 - a) * z
        z_new = z_update(xh + u, st.rho)
        return x_new, z_new, u + xh - z_new

    _, z, _ = jax.lax.fori_loop(0, steps, one, (st.x, st.z, st.u))
    return z


def normalise(z, mask):
    """``max(z, 0)`` on the mask, divided by its sum (when positive)."""
    z = jnp.where(mask, jnp.maximum(z, 0.0), 0.0)
    tot = jnp.sum(z)
    return z / jnp.where(tot > 0, tot, 1.0)


def straight_through(value, diff):
    """``value`` forward, the gradient of ``diff`` backward."""
    return jax.lax.stop_gradient(value) + diff - jax.lax.stop_gradient(diff)
