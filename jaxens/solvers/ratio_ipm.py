r"""A primal-dual interior point (Mehrotra predictor-corrector) with a crossover for the
min-underestimation LP (:class:`~jaxens.solvers.instances.RatioProgram`).

**Problem** (one row; ``Q`` the ``v x r`` orthonormal basis of :math:`\mathrm{span}[A_H, \mathbf 1]`,
:math:`\beta = \beta(m)`, ``r`` small: :math:`r \le n d + 1`):

.. math::  \min_{p,s}\ s \quad\text{s.t.}\quad Q^\top p = \beta,\quad 0 \le p_j \le s\,r_j .

**Scaling.**  With :math:`\rho_j = r_j / \sum_k r_k`, :math:`p_j = \rho_j q_j` and
:math:`\sigma = s\sum_k r_k` it reads :math:`\min \sigma` s.t. :math:`\tilde Q^\top q = \beta`,
:math:`0 \le q_j \le \sigma`, :math:`\tilde Q = \mathrm{diag}(\rho) Q`: every ``q_j`` lies in
:math:`[0, \sigma]` whatever the scale of ``r_j`` (``r`` spans many orders of magnitude).  Tokens off
the mask, or with :math:`r_j \le \epsilon_{\text{dead}}\max r` (``1e-12`` float32 / ``1e-24``
float64: their mass :math:`\le s r_j` is below rounding), are fixed at :math:`p_j = 0`.

**Iteration** (Nocedal & Wright, *Numerical Optimization*, Alg. 14.3).  Slack
:math:`w = \sigma\mathbf 1 - q \ge 0`, duals ``y`` (equalities), :math:`z \ge 0` (:math:`q \ge 0`),
:math:`t \ge 0` (:math:`w \ge 0`).  KKT: :math:`t - z = \tilde Q y`, :math:`\mathbf 1^\top t = 1`,
:math:`\tilde Q^\top q = \beta`, :math:`q\circ z = w\circ t = \mu`.  Eliminating :math:`\Delta z,
\Delta t` leaves, with :math:`d = z/q + t/w`, :math:`e = t/w`,

.. math::

    D\Delta q - e\,\Delta\sigma - \tilde Q\Delta y = g_1,\qquad
    e^\top\Delta q - (\mathbf 1^\top e)\Delta\sigma = g_2,\qquad \tilde Q^\top \Delta q = g_3,

and :math:`\Delta q = D^{-1}(g_1 + e\Delta\sigma + \tilde Q\Delta y)` gives the bordered
``(r+1) x (r+1)`` system in :math:`(\Delta y, \Delta\sigma)` with the ``r x r`` block
:math:`M = \tilde Q^\top D^{-1}\tilde Q`, border :math:`b = \tilde Q^\top D^{-1}e` and corner
:math:`-c`, :math:`c = \mathbf 1^\top e - e^\top D^{-1}e = \sum_j e_j (z_j/q_j)/d_j > 0`.  The Schur
complement on the ``s`` column,

.. math::  (M + bb^\top/c)\,\Delta y = R_1 + b R_2 / c,\qquad \Delta\sigma = (b^\top\Delta y - R_2)/c,

is one ``v r^2`` product and one ``r x r`` LU per iteration (shared by the predictor and the
corrector; LU, not Cholesky: XLA:CPU's Cholesky is an unblocked loop).  Centring
:math:`(\mu_{\text{aff}}/\mu)^3`, separate primal and dual steps, ``step_fraction`` of the way to
the boundary; start :math:`q = \mathbf 1,\ \sigma = 2,\ z = t = \mathbf 1/n_{\text{live}},\ y = 0`
(dual feasible and perfectly centred).

**Crossover** (every iteration, cheap next to the ``v r^2`` product).  A non-degenerate vertex
has exactly :math:`r - 1` free tokens (:math:`0 < p_j < s r_j`; with ``s`` that is ``r`` basic
columns).  The ``r - 1`` tokens of largest :math:`\min(q_j/z_j,\ w_j/t_j)` are taken as free
(``F``), the others as at the bound (``U``: :math:`w_j/t_j < q_j/z_j`) or at zero.  The basis
:math:`B = [\tilde Q_F^\top,\ \tilde Q^\top\mathbf 1_U]` (``r x r``) gives the vertex
:math:`B(q_F, \sigma) = \beta`, :math:`p = \rho\circ(q_F + \sigma\mathbf 1_U)`, and its dual
:math:`B^\top y = e_r` (:math:`(Qy)_F = 0`, :math:`\sum_U r_j(Qy)_j = 1`).

**Certificate and status.**  Every dual ``y`` met (the IPM's and the vertices') gives the bound
:func:`~jaxens.solvers.admm_ratio.ratio_lower_bound`; their maximum is ``LB``.  The candidates
(the vertices and the IPM iterates, clipped at 0 and renormalised) with
:math:`\lVert Q^\top p - \beta\rVert_\infty \le` ``residual_tol`` keep the smallest
:math:`s(p) = \max_j p_j / r_j`.  ``SOLVED`` iff the certified relative gap
:func:`~jaxens.solvers.admm_ratio.ratio_gap` :math:`(s(p) - \mathrm{LB})/s(p) \le` ``tol`` (the loop
stops there); ``Solution.gap`` is that gap (negative when the returned ``p`` is an iterate
that is not yet feasible: :math:`s(p)` below the bound; ``primal_residual`` says by how much).
Otherwise ``INFEASIBLE`` when the IPM's dual is a
Farkas ray: :math:`(d, \gamma) = T^{+\top} y` (``T_pinv``) has :math:`Qy = A_H d + \gamma\mathbf 1`,
:math:`\beta^\top y = m_H^\top d + \gamma`, and ``d / ||d||`` is returned as the certificate when its
margin :math:`d^\top m_H - \max_{k\in\text{mask}} (A_H d)_k` exceeds the least-squares phase's
``feas_tol`` (``p`` is then the last candidate, not the least-squares relaxation: the combiner's
least-squares phase replaces it); else ``MAX_ITERS`` (a non-finite iterate: ``NUMERICAL_ERROR``).

**Known limits.**  Infeasible constraints: the infeasible-start iteration's dual grows slowly
along the Farkas ray, so a row is often ``MAX_ITERS`` (after ``max_iters``) rather than
``INFEASIBLE``; the combiner's least-squares phase certifies it.  Float32 at ``r = 257``
(``n d = 256``): one row in 8 of the Gaussian family never gets a feasible vertex from the
crossover and ends ``MAX_ITERS`` with an infeasible iterate (``docs/benchmarks/ratio.md``); float64
solves it.

**Gradients** (:class:`~jaxens.solvers.adjoint.ImplicitAdjoint` only): the basic solution at the
returned vertex's active set, :func:`~jaxens.solvers.admm_ratio.ratio_basis` (exact at a
non-degenerate vertex; the crossover returns one whenever the status is ``SOLVED``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxens.problem import BottleneckProblem
from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, check_adjoint
from jaxens.solvers.admm_ratio import ratio_basis, ratio_gap, ratio_lower_bound, ratio_row, ratio_value
from jaxens.solvers.base import AbstractSolver
from jaxens.solvers.instances import RatioProgram
from jaxens.solvers.least_squares import default_feas_rtol
from jaxens.solvers.projections import max_linear, uniform_on
from jaxens.solvers.solution import Solution, Status
from jaxens.solvers.splitting import straight_through

__all__ = ["RatioIPM", "RatioIPMState"]


@dataclasses.dataclass(frozen=True)
class RatioIPM(AbstractSolver):
    """Interior point + crossover for :class:`~jaxens.solvers.instances.RatioProgram` (math in the
    module docstring).  No warm start (``warm`` is ignored; the next warm start is ``None``).

    Attributes:
      tol: certified relative gap :math:`(s(p) - \\mathrm{LB})/s(p)` for ``SOLVED`` (``None``:
        ``5e-5`` float32, ``1e-9`` float64; the float32 vertex is accurate to about ``1e-5``
        relative: ``kappa(B) eps``).
      residual_tol: :math:`\\lVert Q^\\top p - \\beta\\rVert_\\infty` of a ``SOLVED`` ``p`` (``None``:
        ``1e-6`` float32, ``1e-11`` float64; :math:`\\lVert\\beta\\rVert_2 \\le 1`).
      max_iters: interior-point iterations at most.
      step_fraction: fraction of the step to the boundary.
      crossover: try the vertex of the iterate's partition at every iteration (without it
        ``SOLVED`` needs the interior iterate itself to certify, which float32 rarely does,
        and the gradient is that of the iterate's support).
      refine: iterative-refinement steps of the crossover's ``r x r`` solves.
      adjoint: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (the basic solution).
    """

    tol: float | None = None
    residual_tol: float | None = None
    max_iters: int = 100
    step_fraction: float = 0.99
    crossover: bool = True
    refine: int = 1
    adjoint: AbstractAdjoint = ImplicitAdjoint()

    accepts: ClassVar[tuple[type, ...]] = (RatioProgram,)

    def __post_init__(self):
        check_adjoint(self.adjoint)
        if not isinstance(self.adjoint, ImplicitAdjoint):
            raise TypeError(f"RatioIPM supports adjoint=ImplicitAdjoint() only, got {self.adjoint!r}")
        if self.max_iters < 1 or not 0 < self.step_fraction < 1:
            raise ValueError(
                f"Expected max_iters >= 1 and 0 < step_fraction < 1, got {self.max_iters}, {self.step_fraction}"
            )
        for name in ("tol", "residual_tol"):
            val = getattr(self, name)
            if val is not None and not val > 0:
                raise ValueError(f"Expected {name} > 0, got {val}")

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(tol, residual_tol)`` for the working ``dtype`` (explicit values win)."""
        wide = jnp.finfo(dtype).bits >= 64
        tol = self.tol if self.tol is not None else (1e-9 if wide else 5e-5)
        res = self.residual_tol if self.residual_tol is not None else (1e-11 if wide else 1e-6)
        return tol, res

    def solve(
        self, problem: BottleneckProblem, instance: RatioProgram, warm: Any = None
    ) -> tuple[Solution, None]:
        """Solve one row (``vmap`` for a batch); returns ``(Solution, None)``."""
        self.check_instance(instance)
        return _ratio_ipm(self, problem, instance.r, instance.mask, instance.m), None

    @staticmethod
    def ratio_value(p: Float[Array, "*B v"], r: Float[Array, "*B v"]) -> Float[Array, "*B"]:
        """The min-underestimation objective ``max_j p_j / r_j`` of a distribution ``p``."""
        return ratio_value(p, r)


class RatioIPMState(NamedTuple):
    """The loop's state: the scaled iterate ``(q, sigma, y, z, t)``, the best certified candidate
    ``(p, s, residual)``, the best bound ``lower``, the iteration count and stop flags."""

    q: Array
    sigma: Array
    y: Array
    z: Array
    t: Array
    p: Array
    s: Array
    residual: Array
    lower: Array
    iterations: Array
    done: Array
    failed: Array


def _max_step(x, dx, live):
    ratio = jnp.where(live & (dx < 0), -x / jnp.where(dx < 0, dx, -1.0), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratio))


@functools.partial(jax.jit, static_argnames=("solver",))
def _ratio_ipm(solver: RatioIPM, problem: BottleneckProblem, r, mask, m) -> Solution:
    dtype = problem.A.dtype
    v, D = problem.A.shape
    finite_in, r, mask, m = ratio_row(problem, r, mask, m)
    r_live, m_live = r, m
    prob_ng, r, m = jax.lax.stop_gradient((problem, r, m))
    Q = prob_ng.Q
    rank = Q.shape[1]
    beta = prob_ng.beta(m)
    tol, res_tol = solver.tolerances(dtype)
    eps = float(jnp.finfo(dtype).eps)
    dead_rtol = 1e-24 if jnp.finfo(dtype).bits >= 64 else 1e-12
    live = mask & (r > dead_rtol * jnp.max(r))
    n_live = jnp.maximum(jnp.sum(live), 1).astype(dtype)
    total = jnp.sum(jnp.where(live, r, 0.0))
    rho = jnp.where(live, r / jnp.where(total > 0, total, 1.0), 0.0)
    Qt = Q * rho[:, None]  # diag(rho) Q
    fl = live.astype(dtype)
    nb = min(rank - 1, v)  # free tokens of a vertex
    eye = jnp.eye(rank, dtype=dtype)

    def candidate(q):
        """``(p, s(p), ||Q^T p - beta||)`` of the scaled point ``q`` (clipped, renormalised)."""
        p = jnp.where(live, rho * jnp.maximum(q, 0.0), 0.0)
        tot = jnp.sum(p)
        p = p / jnp.where(tot > 0, tot, 1.0)
        ok = jnp.all(jnp.isfinite(p)) & (tot > 0)
        res = jnp.where(ok, jnp.max(jnp.abs(Q.T @ p - beta)), jnp.inf)
        s = jnp.where(ok, ratio_value(p, r), jnp.inf)
        return jnp.where(ok, p, 0.0), s, res

    def bound(y):
        lb = ratio_lower_bound(Q, beta, r, y)
        return jnp.where(jnp.all(jnp.isfinite(y)) & jnp.isfinite(lb), lb, 0.0)

    def vertex(st):
        """The crossover: the basic solution and dual of the iterate's partition."""
        ratio_q = st.q / st.z
        ratio_w = (st.sigma - st.q) / st.t
        score = jnp.where(live, jnp.minimum(ratio_q, ratio_w), -jnp.inf)
        _, idx = jax.lax.top_k(score, nb)
        free = jnp.zeros((v,), bool).at[idx].set(True) & live
        upper = live & ~free & (ratio_w < ratio_q)
        B = jnp.concatenate([Qt[idx].T * free[idx][None, :], (Qt.T @ upper.astype(dtype))[:, None]], axis=1)
        lu = jax.scipy.linalg.lu_factor(B)
        x = jax.scipy.linalg.lu_solve(lu, beta)
        y = jax.scipy.linalg.lu_solve(lu, eye[-1], trans=1)
        for _ in range(solver.refine):  # iterative refinement at the working precision
            x = x + jax.scipy.linalg.lu_solve(lu, beta - B @ x)
            y = y + jax.scipy.linalg.lu_solve(lu, eye[-1] - B.T @ y, trans=1)
        q = jnp.zeros((v,), dtype).at[idx].set(jnp.where(free[idx], x[:-1], 0.0)) + x[-1] * upper
        return q, y

    def newton(st, w, d, e, lu, cc, b, rd, rsig, rp, rc1, rc2):
        g1 = jnp.where(live, -rd - rc1 / st.q + rc2 / w, 0.0)
        g2 = rsig + jnp.sum(jnp.where(live, rc2 / w, 0.0))
        g3 = -rp
        dinv = jnp.where(live, 1.0 / d, 0.0)
        R1 = g3 - Qt.T @ (g1 * dinv)
        R2 = g2 - jnp.sum(e * g1 * dinv)
        dy = jax.scipy.linalg.lu_solve(lu, R1 + b * (R2 / cc))
        dsig = (b @ dy - R2) / cc
        dq = jnp.where(live, (g1 + e * dsig + Qt @ dy) * dinv, 0.0)
        dz = jnp.where(live, (-rc1 - st.z * dq) / st.q, 0.0)
        dw = jnp.where(live, dsig - dq, 0.0)
        dt = jnp.where(live, (-rc2 - st.t * dw) / w, 0.0)
        return dq, dsig, dy, dz, dw, dt

    def body(st):
        q, sigma, y, z, t = st.q, st.sigma, st.y, st.z, st.t
        w = jnp.where(live, sigma - q, 0.0)
        rd = jnp.where(live, t - z - Qt @ y, 0.0)
        rsig = 1.0 - jnp.sum(t)
        rp = Qt.T @ q - beta
        mu = (q @ z + w @ t) / (2.0 * n_live)
        zq = jnp.where(live, z / jnp.where(live, q, 1.0), 0.0)
        e = jnp.where(live, t / jnp.where(live, w, 1.0), 0.0)
        d = jnp.where(live, zq + e, 1.0)
        dinv = jnp.where(live, 1.0 / d, 0.0)
        M = (Qt * dinv[:, None]).T @ Qt
        b = Qt.T @ (e * dinv)
        cc = jnp.sum(e * zq * dinv)
        cc = jnp.maximum(cc, jnp.finfo(dtype).tiny)
        S = M + jnp.outer(b, b) / cc
        S = 0.5 * (S + S.T)
        reg = 1e-3 * eps**2 * (1.0 + jnp.max(jnp.abs(jnp.diag(S))))
        lu = jax.scipy.linalg.lu_factor(S + reg * eye)
        args = (st, w, d, e, lu, cc, b, rd, rsig, rp)
        dq, dsig, dy, dz, dw, dt = newton(*args, q * z, w * t)
        ap = jnp.minimum(_max_step(q, dq, live), _max_step(w, dw, live))
        ad = jnp.minimum(_max_step(z, dz, live), _max_step(t, dt, live))
        mu_aff = ((q + ap * dq) @ (z + ad * dz) + (w + ap * dw) @ (t + ad * dt)) / (2.0 * n_live)
        cent = (mu_aff / mu) ** 3
        dq, dsig, dy, dz, dw, dt = newton(*args, q * z + dq * dz - cent * mu, w * t + dw * dt - cent * mu)
        f = solver.step_fraction
        ap = f * jnp.minimum(_max_step(q, dq, live), _max_step(w, dw, live))
        ad = f * jnp.minimum(_max_step(z, dz, live), _max_step(t, dt, live))
        q_n, sig_n = q + ap * dq, sigma + ap * dsig
        y_n, z_n, t_n = y + ad * dy, z + ad * dz, t + ad * dt
        finite = (
            jnp.all(jnp.isfinite(q_n)) & jnp.isfinite(sig_n) & jnp.all(jnp.isfinite(y_n))
            & jnp.all(jnp.isfinite(z_n)) & jnp.all(jnp.isfinite(t_n))
        )
        new = st._replace(q=q_n, sigma=sig_n, y=y_n, z=z_n, t=t_n)
        # candidates and bounds: the iterate, and its vertex
        lower = jnp.maximum(st.lower, bound(y_n))
        cands = [candidate(q_n)]
        if solver.crossover:
            qv, yv = vertex(new)
            lower = jnp.maximum(lower, bound(yv))
            cands.append(candidate(qv))
        p_b, s_b, res_b = st.p, st.s, st.residual
        for p_c, s_c, res_c in cands:
            take = finite & (res_c <= res_tol) & (s_c < s_b)
            p_b = jnp.where(take, p_c, p_b)
            s_b = jnp.where(take, s_c, s_b)
            res_b = jnp.where(take, res_c, res_b)
        lower = jnp.where(finite, lower, st.lower)
        certified = ratio_gap(s_b, lower) <= tol
        mu_n = (q_n @ z_n + (sig_n - q_n) @ jnp.where(live, t_n, 0.0)) / (2.0 * n_live)
        floor = mu_n <= eps**2 * 1e-2  # nothing left to gain at the working precision
        keep = jax.tree.map(lambda a, b_: jnp.where(finite, a, b_), new, st)
        return keep._replace(
            p=p_b, s=s_b, residual=res_b, lower=lower, iterations=st.iterations + 1,
            done=certified | ~finite | floor, failed=~finite,
        )

    q0 = fl
    t0 = jnp.where(live, 1.0 / n_live, 0.0)
    p_unif = uniform_on(mask, dtype)
    p0, s0, res0 = candidate(q0)
    take0 = res0 <= res_tol
    inf = jnp.asarray(jnp.inf, dtype)
    st = RatioIPMState(
        q=q0, sigma=jnp.asarray(2.0, dtype), y=jnp.zeros((rank,), dtype), z=t0, t=t0,
        p=jnp.where(take0, p0, p_unif), s=jnp.where(take0, s0, inf), residual=jnp.where(take0, res0, inf),
        lower=bound(jnp.zeros((rank,), dtype)), iterations=jnp.zeros((), jnp.int32),
        done=~finite_in, failed=jnp.zeros((), bool),
    )
    st = jax.lax.while_loop(lambda s_: (~s_.done) & (s_.iterations < solver.max_iters), body, st)

    # no certified candidate: the last iterate (clipped, renormalised)
    p_last, s_last, res_last = candidate(st.q)
    have = jnp.isfinite(st.s)
    p = jnp.where(have, st.p, jnp.where(jnp.isfinite(s_last), p_last, p_unif))
    s_val = jnp.where(have, st.s, s_last)
    res = jnp.where(have, st.residual, res_last)
    gap = ratio_gap(s_val, st.lower)
    solved = (gap <= tol) & (res <= res_tol)
    # Farkas ray of the IPM's dual (infeasible constraints): d = first D_H entries of T_pinv^T y
    hard_cols = np.asarray(prob_ng.columns(prob_ng.hard), np.int64)
    m_h = m[hard_cols]
    dvec = (prob_ng.T_pinv.T @ st.y)[:-1]
    dn = jnp.linalg.norm(dvec)
    dvec = dvec / jnp.where(dn > 0, dn, 1.0)
    margin = dvec @ m_h - max_linear(prob_ng.A_hard @ dvec, mask, None)
    margin = jnp.where(jnp.isfinite(margin) & (dn > 0), margin, -jnp.inf)
    feas_tol = default_feas_rtol(dtype) * jnp.maximum(1.0, jnp.linalg.norm(m_h))
    infeasible = ~solved & (margin > feas_tol)
    other = jnp.where(st.failed & ~have, Status.NUMERICAL_ERROR, Status.MAX_ITERS)
    status = jnp.where(solved, Status.SOLVED, jnp.where(infeasible, Status.INFEASIBLE, other))
    status = jnp.where(finite_in, status, Status.NONFINITE_INPUT).astype(jnp.int32)
    p = jnp.where(finite_in, p, p_unif)
    cert = jnp.zeros((D,), dtype).at[hard_cols].set(dvec)
    p_d = straight_through(p, ratio_basis(problem, p, r_live, m_live, mask))
    return Solution(
        p=jnp.where(finite_in, p_d, p),
        status=status,
        primal_residual=prob_ng.hard_residual(p, m),
        gap=jnp.where(finite_in, gap, jnp.inf).astype(dtype),
        iterations=st.iterations,
        certificate=jnp.where(infeasible, cert, 0.0),
        certificate_margin=jnp.where(jnp.isfinite(margin), margin, 0.0).astype(dtype),
    )
