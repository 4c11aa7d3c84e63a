r"""The entropic dual of :mod:`jaxens.solvers.entropic_newton`: its data and oracles (one row).

With :math:`G, b, R^{-1}` of :func:`jaxens.solvers.dual.dual_blocks` and prior logits
:math:`\theta` (0 off the effective mask),

.. math::

   \varphi(z) = \operatorname{logsumexp}_{\text{mask}}(\theta + G z) - b^\top z
       + \tfrac12 z^\top R^{-1} z, \qquad p(z) = \mathrm{softmax}_{\text{mask}}(\theta + G z),
   \qquad \nabla\varphi = G^\top p - b + R^{-1} z,

(:func:`dual_value`, :func:`dual_logp`, :func:`dual_grad`); :func:`log_mgf` is the line search's
:math:`\log\sum_j p_j e^{t e_j}` evaluated without cancellation, :func:`lp_gap` the LP
duality gap reported by the continuation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxens.solvers.dual import dual_blocks, soft_cols_rho

__all__ = ["EntropicDual", "build_dual", "dual_logp", "dual_grad", "dual_value", "log_mgf", "nonfinite_input", "lp_gap"]


class EntropicDual(NamedTuple):
    G: Float[Array, "v k"]
    theta: Float[Array, " v"]  # finite; 0 off mask
    mask: Bool[Array, " v"]  # effective mask (also excludes theta == -inf)
    b: Float[Array, " k"]
    rinv: Float[Array, " k"]  # 0 on hard coordinates, 1/rho on soft ones


def build_dual(problem, theta, mask, m, rho) -> EntropicDual:
    dtype = problem.Q.dtype
    theta = theta.astype(dtype)
    ok = mask & (theta > -jnp.inf) & jnp.isfinite(theta)
    theta = jnp.where(ok, theta, 0.0)
    G, b, rinv = dual_blocks(problem, m, rho)
    return EntropicDual(G, theta, ok, b, rinv)


def dual_logp(d: EntropicDual, z) -> Float[Array, " v"]:
    logits = jnp.where(d.mask, d.theta + d.G @ z, -jnp.inf)
    return jax.nn.log_softmax(logits)


def dual_grad(d: EntropicDual, z, p) -> Float[Array, " k"]:
    return p @ d.G - d.b + d.rinv * z


def dual_value(d: EntropicDual, z) -> Float[Array, ""]:
    logits = jnp.where(d.mask, d.theta + d.G @ z, -jnp.inf)
    return jax.nn.logsumexp(logits) - d.b @ z + 0.5 * jnp.sum(d.rinv * z * z)


def expm1mx(x):
    """``expm1(x) - x`` without cancellation (series for small ``|x|``)."""
    small = jnp.abs(x) < 0.1
    xs = jnp.where(small, x, 0.0)
    series = xs * xs * (
        0.5 + xs * (1 / 6 + xs * (1 / 24 + xs * (1 / 120 + xs * (1 / 720 + xs * (1 / 5040 + xs / 40320)))))
    )
    xl = jnp.where(small, 0.0, x)
    return jnp.where(small, series, jnp.expm1(xl) - xl)


def log_mgf(d: EntropicDual, logp, p, e, t):
    r""":math:`\log\sum_j p_j e^{t e_j}` for :math:`e` with :math:`p^\top e = 0` (``>= 0``)."""
    te = jnp.where(d.mask, t * e, 0.0)
    big = jnp.max(jnp.where(d.mask, te, -jnp.inf))
    small_val = jnp.log1p(jnp.sum(jnp.where(d.mask, p * expm1mx(jnp.minimum(te, 1.0)), 0.0)))
    large_val = jax.nn.logsumexp(jnp.where(d.mask, logp + te, -jnp.inf))
    return jnp.where(big <= 1.0, small_val, large_val)


def nonfinite_input(theta, mask, m, rho, problem) -> Bool[Array, ""]:
    bad_theta = jnp.any(mask & (jnp.isnan(theta) | (theta == jnp.inf)))
    bad_m = ~jnp.all(jnp.isfinite(m))
    bad_rho = ~jnp.all(jnp.isfinite(soft_cols_rho(problem, rho))) if problem.soft else False
    return bad_theta | bad_m | bad_rho | ~jnp.any(mask & (theta > -jnp.inf))


def lp_gap(problem, d: EntropicDual, c, p, m, rho, y_all):
    """LP (or soft QP) duality gap at ``p`` with dual ``y = y_all[:r]``, ``u = -y_all[r:]``."""
    r = problem.rank
    y, u = y_all[:r], -y_all[r:]
    reduced = c - problem.Q @ y
    primal = jnp.sum(jnp.where(d.mask, p * c, 0.0))
    dual = problem.beta(m) @ y
    if problem.soft:
        A_S = problem.A_of(problem.soft)
        m_S = m[problem.columns(problem.soft)]
        rho_c = soft_cols_rho(problem, rho)
        w = p @ A_S - m_S
        primal = primal + 0.5 * jnp.sum(rho_c * w * w)
        reduced = reduced + A_S @ u
        dual = dual - m_S @ u - 0.5 * jnp.sum(u * u / rho_c)
    dual = dual + jnp.min(jnp.where(d.mask, reduced, jnp.inf))
    return primal - dual
