r"""A dense primal-dual interior-point method (Mehrotra predictor-corrector) for a small QP.

**Problem** (one row; ``K`` variables, ``r`` equality constraints, a low-rank Hessian):

.. math::

    \min_{x,\,t^\pm}\ \tfrac12\lVert G^\top x\rVert^2 + c^\top x + M\,\mathbf 1^\top(t^+ + t^-)
    \quad\text{s.t.}\quad E x + t^+ - t^- = \beta,\qquad x,\ t^\pm \ge 0,

with :math:`E\in\mathbb R^{r\times K}`, :math:`G\in\mathbb R^{K\times k}` (``k`` may be 0: an
LP).  The *elastic* variables :math:`t^\pm` make every instance feasible; with
:math:`M > \lVert y^\star\rVert_\infty` (an exact penalty) they vanish at the optimum whenever
:math:`\{x \ge 0 : Ex = \beta\}` is non-empty, and a non-zero :math:`t` says the restricted
problem is infeasible.  It is the restricted master problem of
:mod:`jaxens.solvers.working_set`, which keeps ``K`` small (a few times ``r``).

**Iteration** (Nocedal & Wright, *Numerical Optimization*, Alg. 14.3 and §16.6).  With
:math:`z = (x, t^+, t^-)`, dual :math:`y`, slacks :math:`s`, the residuals
:math:`r_p = E_z z - \beta`, :math:`r_d = Hz + c_z - E_z^\top y - s`, :math:`r_c = z\circ s`
and :math:`\Theta = \mathrm{diag}(z/s)`, each Newton system is reduced to the ``r x r`` normal
equations

.. math::  E_z K^{-1} E_z^\top\,\Delta y = -r_p - E_z K^{-1} g,\qquad K = H + \Theta^{-1},

where :math:`K^{-1} = \Theta - \Theta G(I + G^\top\Theta G)^{-1}G^\top\Theta` on the ``x``
block (Woodbury, ``k x k``) and :math:`\Theta` on the elastic block, so the normal matrix is
:math:`E\Theta_xE^\top - B(I+G^\top\Theta_xG)^{-1}B^\top + \mathrm{diag}(\theta_{t^+}+\theta_{t^-})`,
:math:`B = E\Theta_xG`: one ``K r^2`` product and one ``r x r`` (and one ``k x k``) factorisation per iteration.
A predictor (affine) step gives the centring :math:`\sigma = (\mu_{\text{aff}}/\mu)^3`; the
corrector solves with :math:`r_c + \Delta z_{\text{aff}}\circ\Delta s_{\text{aff}} - \sigma\mu`
and the same factorisation (LU: XLA:CPU's Cholesky is an unblocked loop, 100x slower at
``r = 257``); steps go ``0.99`` of the way to the boundary (one common step for a
QP, separate primal and dual steps for an LP).

**Stopping**: the merit, the largest of the relative primal and dual residuals and the
relative complementarity :math:`z^\top s / (1 + |f|)`, at most ``tol``; or, once it is below ``1e-3``,
three steps that do not lower it by 10 % (the working precision's floor: float32 stalls near ``1e-5``), a
non-finite step, or ``max_iters``.  The iterate of smallest merit is returned.  Run it in float64 (the restricted problem is
small): the normal matrix's conditioning grows like :math:`1/\mu`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = ["IPMResult", "dense_qp_ipm"]


class IPMResult(NamedTuple):
    """The restricted QP's solution: ``x`` (``K``), elastic ``t`` (``t+ - t-``, ``r``), the
    equality duals ``y`` (``r``), the iteration count and whether ``tol`` was met."""

    x: Float[Array, " K"]
    t: Float[Array, " r"]
    y: Float[Array, " r"]
    iterations: Int[Array, ""]
    converged: Bool[Array, ""]
    merit: Float[Array, ""]  # max(relative primal, dual residual, relative complementarity)


class _State(NamedTuple):
    z: Array
    y: Array
    s: Array
    k: Array
    done: Array
    best: Any  # (z, y, s) of the smallest merit so far
    best_merit: Array
    stall: Array


def dense_qp_ipm(
    E: Float[Array, "r K"],
    G: Float[Array, "K k"],
    c: Float[Array, " K"],
    beta: Float[Array, " r"],
    valid: Bool[Array, " K"],
    penalty: Float[Array, ""] | float,
    tol: float = 1e-10,
    max_iters: int = 60,
) -> IPMResult:
    """Solve the elastic QP of the module docstring (``x_j = 0`` where ``valid`` is false).

    Example::

        res = dense_qp_ipm(E, jnp.zeros((K, 0)), c, beta, jnp.ones(K, bool), 100.0)
        res.x, res.y      # primal and equality duals; res.t == 0 when E x = beta, x >= 0 has a solution
    """
    r, K = E.shape
    k = G.shape[1]
    dt = E.dtype
    valid = jnp.asarray(valid, bool)
    # an invalid column is decoupled: no constraint row, no Hessian, cost 1 (x_j -> 0)
    E = jnp.where(valid[None, :], E, 0.0)
    G = jnp.where(valid[:, None], G, 0.0)
    c = jnp.where(valid, c, 1.0)
    penalty = jnp.asarray(penalty, dt)
    cz = jnp.concatenate([c, jnp.full((2 * r,), penalty, dt)])
    N = K + 2 * r
    eye_r = jnp.eye(r, dtype=dt)

    def Ez(z):
        return E @ z[:K] + z[K : K + r] - z[K + r :]

    def EzT(y):
        return jnp.concatenate([E.T @ y, y, -y])

    def Hz(z):
        if not k:
            return jnp.zeros_like(z)
        return jnp.concatenate([G @ (G.T @ z[:K]), jnp.zeros((2 * r,), dt)])

    def objective(z):
        quad = 0.5 * jnp.sum((G.T @ z[:K]) ** 2) if k else 0.0
        return quad + cz @ z

    def factor(theta):
        tx = theta[:K]
        ET = E * tx[None, :]
        Mn = ET @ E.T + jnp.diag(theta[K : K + r] + theta[K + r :])
        if k:
            B = ET @ G
            C = jnp.eye(k, dtype=dt) + (G * tx[:, None]).T @ G
            Lc = jax.scipy.linalg.lu_factor(C)
            CB = jax.scipy.linalg.lu_solve(Lc, B.T)
            Mn = Mn - B @ CB
        else:
            Lc = None
        Mn = 0.5 * (Mn + Mn.T)
        # a proximal regularisation at the working precision (the matrix's conditioning grows
        # like 1/mu; Mehrotra's steps tolerate the slightly inexact direction)
        reg = 1e-3 * jnp.finfo(dt).eps ** 2 * (1.0 + jnp.max(jnp.abs(jnp.diag(Mn))))
        L = jax.scipy.linalg.lu_factor(Mn + reg * eye_r)
        return L, Lc

    def kinv(theta, Lc, w):
        out = theta * w
        if k:
            wx = out[:K]
            corr = G @ jax.scipy.linalg.lu_solve(Lc, G.T @ wx)
            out = out.at[:K].add(-theta[:K] * corr)
        return out

    def newton(z, s, theta, L, Lc, rd, rp, rc):
        g = -rd - rc / z
        u = kinv(theta, Lc, g)
        dy = jax.scipy.linalg.lu_solve(L, -rp - Ez(u))
        dz = kinv(theta, Lc, EzT(dy)) + u
        ds = -(rc + s * dz) / z
        return dz, dy, ds

    def max_step(v, dv):
        ratio = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf)
        return jnp.minimum(1.0, jnp.min(ratio))

    scale_p = 1.0 + jnp.max(jnp.abs(beta))
    scale_d = 1.0 + jnp.max(jnp.abs(cz))

    def residuals(st):
        rp = Ez(st.z) - beta
        rd = Hz(st.z) + cz - EzT(st.y) - st.s
        return rp, rd

    def merit(st):
        rp, rd = residuals(st)
        gap = st.z @ st.s / (1.0 + jnp.abs(objective(st.z)))
        return jnp.maximum(jnp.maximum(jnp.max(jnp.abs(rp)) / scale_p, jnp.max(jnp.abs(rd)) / scale_d), gap)

    def body(st):
        z, y, s = st.z, st.y, st.s
        rp, rd = residuals(st)
        mu = z @ s / N
        theta = z / s
        L, Lc = factor(theta)
        dz_a, dy_a, ds_a = newton(z, s, theta, L, Lc, rd, rp, z * s)
        ap, ad = max_step(z, dz_a), max_step(s, ds_a)
        if k:
            ap = ad = jnp.minimum(ap, ad)
        mu_aff = (z + ap * dz_a) @ (s + ad * ds_a) / N
        sigma = (mu_aff / mu) ** 3
        rc = z * s + dz_a * ds_a - sigma * mu
        dz, dy, ds = newton(z, s, theta, L, Lc, rd, rp, rc)
        ap, ad = 0.99 * max_step(z, dz), 0.99 * max_step(s, ds)
        if k:
            ap = ad = jnp.minimum(ap, ad)
        new = st._replace(z=z + ap * dz, y=y + ad * dy, s=s + ad * ds, k=st.k + 1)
        finite = jnp.all(jnp.isfinite(new.z)) & jnp.all(jnp.isfinite(new.s)) & jnp.all(jnp.isfinite(new.y))
        mer = jnp.where(finite, merit(new), jnp.inf)
        better = mer < 0.9 * st.best_merit
        keep = mer < st.best_merit
        new = new._replace(
            best=jax.tree.map(lambda a, b: jnp.where(keep, a, b), (new.z, new.y, new.s), st.best),
            best_merit=jnp.minimum(mer, st.best_merit),
            # stalls count only near the end (early merits may rise before they fall)
            stall=jnp.where(better | (st.best_merit > 1e-3), 0, st.stall + 1),
        )
        # stop at the tolerance, at a non-finite step, or after 3 steps without progress (the
        # working precision's floor); the best iterate is returned
        return new._replace(done=(mer <= tol) | ~finite | (new.stall >= 3))

    # starting point (Mehrotra's heuristic shifts, from the uniform x)
    nv = jnp.maximum(jnp.sum(valid), 1)
    x0 = jnp.where(valid, 1.0 / nv, 1.0).astype(dt)
    res = beta - E @ x0
    z0 = jnp.concatenate([x0, jnp.maximum(res, 0.0), jnp.maximum(-res, 0.0)])
    y0 = jnp.zeros((r,), dt)
    s0 = Hz(z0) + cz
    z0 = z0 + jnp.maximum(-1.5 * jnp.min(z0), 0.0)
    s0 = s0 + jnp.maximum(-1.5 * jnp.min(s0), 0.0)
    zs = z0 @ s0
    z0 = z0 + 0.5 * zs / jnp.sum(s0) + 1e-8
    s0 = s0 + 0.5 * zs / jnp.sum(z0) + 1e-8
    zero = jnp.zeros((), jnp.int32)
    st = _State(z0, y0, s0, zero, jnp.zeros((), bool), (z0, y0, s0), jnp.asarray(jnp.inf, dt), zero)
    st = st._replace(best_merit=merit(st))
    st = st._replace(done=st.best_merit <= tol)
    st = jax.lax.while_loop(lambda s_: (~s_.done) & (s_.k < max_iters), body, st)
    z, y, _ = st.best
    x = jnp.where(valid, z[:K], 0.0)
    return IPMResult(x, z[K : K + r] - z[K + r :], y, st.k, st.best_merit <= tol, st.best_merit)
