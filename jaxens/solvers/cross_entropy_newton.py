r"""Cross-entropy projection (``cross_entropy`` objective) by primal-dual Newton on its dual.

Instance: :class:`~jaxens.solvers.instances.MixtureCrossEntropy`.

Per row, with the members' mixture :math:`s = \sum_i w_i \hat p_i` (:math:`\sum_i w_i = 1`),
hard constraints :math:`Q^\top p = \beta` (``problem.beta(m)``, which includes
:math:`\mathbf 1^\top p = 1`) and soft members :math:`S`:

.. math::

   \min_{p \ge 0,\ p_j = 0 \text{ off mask}}\ -\sum_j s_j \log p_j
     + \sum_{i\in S} \tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2
   \quad\text{s.t.}\quad Q^\top p = \beta,

i.e. :math:`\min_p \sum_i w_i H(\hat p_i, p)`.  Without constraints the answer is probability
averaging :math:`p = s`.

**Dual.**  With the dual blocks :math:`G = [Q,\ A_S]`, :math:`b = (\beta, m_S)`,
:math:`R^{-1} = \mathrm{blockdiag}(0, I/\rho_i)` of :mod:`jaxens.solvers.dual` (the soft term by
conjugacy) and :math:`x = (y, u)`:  The Lagrangian
:math:`-\sum_j s_j\log p_j + p^\top G x - b^\top x - \tfrac12 x^\top R^{-1}x` is minimised by
:math:`p_j = s_j / (Gx)_j` (which needs :math:`(Gx)_j > 0`), and the dual is

.. math::

   \min_{x:\ Gx > 0}\ f(x) = -\sum_j s_j \log (Gx)_j + b^\top x + \tfrac12 x^\top R^{-1} x
   \quad (+\ \text{const}),

   \nabla f = b - G^\top p + R^{-1}x, \qquad
   \nabla^2 f = G^\top \mathrm{diag}(s_j/(Gx)_j^2)\, G + R^{-1}
             = G^\top \mathrm{diag}(p_j^2/s_j)\, G + R^{-1},

with :math:`u^\star = \rho\,(A_S^\top p - m_S)` at the optimum (the soft penalty's gradient).
The start :math:`x_0 = (Q^\top\mathbf 1, 0)` gives :math:`Gx_0 = \mathbf 1` and :math:`p_0 = s`.

**Algorithm** (primal-dual Newton, as in interior-point methods).  The optimality conditions
are :math:`p_j\,(Gx)_j = s_j` on the mask and :math:`G^\top p - b - R^{-1}x = 0` (the dual
gradient): a central-path system whose "barrier weights" are the fixed :math:`s_j`.  Newton on
:math:`(p, x)` with :math:`w = Gx`, :math:`r_c = s - p\circ w`, :math:`r_d = G^\top p - b - R^{-1}x`:

.. math::

   [G^\top \mathrm{diag}(p/w)\, G + R^{-1}]\,\Delta x = G^\top (r_c/w) + r_d, \qquad
   \Delta p = (r_c - p\circ G\Delta x)/w,

a ``k x k`` Cholesky solve per step (``O(v k^2)`` to form).  The step is cut to
``boundary_fraction`` of the distance to the boundary of :math:`p > 0`, :math:`w > 0`, then
backtracked until :math:`\lVert(r_c, r_d)\rVert_2^2` decreases sufficiently.  This is far more
robust than Newton on :math:`f` alone (whose quadratic model ignores tokens of tiny
:math:`s_j`, so that the domain :math:`Gx > 0` cuts every step short).  Stops when
:math:`\lVert r_d\rVert_\infty \le` ``tol`` and :math:`\lVert r_c\rVert_1 \le` ``tol``
(``gap`` reports :math:`\lVert r_d\rVert_\infty`, the dual gradient norm).  Mass
:math:`s_j` below ``s_floor`` on allowed tokens is raised to ``s_floor``: the dual needs
:math:`(Gx)_j > 0` on every allowed token, and tokens of zero mixture mass can still receive
mass when the constraints demand it.  The returned ``p = s/(Gx)`` is renormalised to sum to
one (a no-op at convergence).

Limits: when the constraints put mass where the mixture has almost none (:math:`s_j` many
orders of magnitude below :math:`p_j`), the optimum has :math:`(Gx)_j \approx s_j/p_j`, below
the round-off of :math:`Gx` in the working precision, and the method stalls (``MAX_ITERS``
with the residuals reported).  Raise ``s_floor`` (e.g. ``1e-8`` in float32) in that regime.

Gradients with respect to ``s``, ``m``, ``rho`` and the problem's arrays use the implicit
function theorem on :math:`\nabla f(x^\star) = 0` (:mod:`jaxens.solvers.implicit`; the only
adjoint).  The Newton loop is :func:`jaxens.solvers.base.iterate`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.base import AbstractIterativeSolver, iterate
from jaxens.solvers.dual import NewtonInfo, chol_solve, dual_blocks, gram, num_dual, soft_cols_rho, uniform_fallback
from jaxens.solvers.implicit import implicit_root
from jaxens.solvers.instances import MixtureCrossEntropy
from jaxens.solvers.solution import Solution, Status

__all__ = ["CrossEntropyNewton"]


class _Dual(NamedTuple):
    G: Float[Array, "v k"]
    s: Float[Array, " v"]  # floored on the mask, 0 off it
    mask: Bool[Array, " v"]
    b: Float[Array, " k"]
    rinv: Float[Array, " k"]


class _State(NamedTuple):
    x: Float[Array, " k"]
    p: Float[Array, " v"]
    gnorm: Float[Array, ""]
    iteration: Int[Array, ""]
    status: Int[Array, ""]
    done: Bool[Array, ""]


class _Row(NamedTuple):
    """What the Newton iteration closes over: the dual's data and the tolerance."""

    d: _Dual
    tol: float


@dataclasses.dataclass(frozen=True)
class CrossEntropyNewton(AbstractIterativeSolver):
    r"""Primal-dual Newton for the cross-entropy projection (math in the module docstring).

    Solves :math:`\min_p -\sum_j s_j \log p_j` over the bottleneck set
    (:math:`s = \sum_i w_i \hat p_i`; probability averaging when unconstrained) from its KKT
    conditions :math:`p_j = s_j / (G y)_j`, :math:`G^\top p = b`, by damped Newton steps in the
    dual :math:`y` that keep :math:`G y > 0`.

    Accepts :class:`~jaxens.solvers.instances.MixtureCrossEntropy`; the warm start is the dual
    ``x`` returned by the previous call (:meth:`cold_start`: ``(Q^T 1, 0)``).

    Attributes:
      tol: stop when ``||r_d||_inf <= tol`` and ``||r_c||_1 <= tol``; ``None``: 1e-5 (float32)
        / 1e-10 (float64).
      max_iters: Newton steps.
      ls_max_steps, ls_shrink, armijo: backtracking settings (on the squared residual norm).
      boundary_fraction: fraction of the distance to the boundary (``p = 0`` or ``Gx = 0``) a step may go.
      s_floor: floor of the mixture mass on allowed tokens (``None``: 1e-30).
    """

    tol: float | None = None
    max_iters: int = 100
    ls_max_steps: int = 40
    ls_shrink: float = 0.5
    armijo: float = 1e-4
    boundary_fraction: float = 0.99
    s_floor: float | None = None

    accepts: ClassVar[tuple[type, ...]] = (MixtureCrossEntropy,)

    def __post_init__(self):
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if not 0.0 < self.ls_shrink < 1.0:
            raise ValueError(f"Expected 0 < ls_shrink < 1, got {self.ls_shrink}")
        if not 0.0 < self.boundary_fraction < 1.0:
            raise ValueError(f"Expected 0 < boundary_fraction < 1, got {self.boundary_fraction}")

    def _tol(self, dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5

    def cold_start(self, problem: BottleneckProblem, dtype=None) -> Float[Array, " k"]:
        """``x0 = (Q^T 1, 0)``, for which ``G x0 = 1``."""
        dtype = dtype or problem.Q.dtype
        y0 = jnp.sum(problem.Q, axis=0)
        return jnp.concatenate([y0, jnp.zeros((num_dual(problem) - problem.rank,), y0.dtype)]).astype(dtype)

    def _build(self, problem, s, mask, m, rho) -> _Dual:
        dtype = problem.Q.dtype
        floor = self.s_floor if self.s_floor is not None else 1e-30
        s = s.astype(dtype)
        s = jnp.where(mask, jnp.maximum(jnp.where(jnp.isfinite(s), s, 0.0), floor), 0.0)
        G, b, rinv = dual_blocks(problem, m, rho)
        return _Dual(G, s, mask, b, rinv)

    @staticmethod
    def _p(d: _Dual, x):
        gx = d.G @ x
        return jnp.where(d.mask, d.s / jnp.where(d.mask, gx, 1.0), 0.0), gx

    @staticmethod
    def _grad(d: _Dual, x, p):
        return d.b - p @ d.G + d.rinv * x

    def _residuals(self, d: _Dual, p, x):
        """Primal-dual residuals ``r_c = s - p * (G x)`` (on the mask) and ``r_d = -grad``."""
        w = d.G @ x
        r_c = jnp.where(d.mask, d.s - p * w, 0.0)
        r_d = p @ d.G - d.b - d.rinv * x
        return r_c, r_d, w

    @staticmethod
    def _measures(r_c, r_d):
        return jnp.max(jnp.abs(r_d)), jnp.sum(jnp.abs(r_c))

    def _newton_loop(self, d: _Dual, x0, skip):
        tol = self._tol(d.G.dtype)
        p0, _ = self._p(d, x0)
        r_c, r_d, _ = self._residuals(d, p0, x0)
        gnorm, cnorm = self._measures(r_c, r_d)
        finite = jnp.isfinite(gnorm) & jnp.isfinite(cnorm)
        conv = (gnorm <= tol) & (cnorm <= tol)
        status = jnp.where(
            skip,
            Status.NONFINITE_INPUT,
            jnp.where(~finite, Status.NUMERICAL_ERROR, jnp.where(conv, Status.SOLVED, Status.MAX_ITERS)),
        ).astype(jnp.int32)
        s0 = _State(x0, p0, gnorm, jnp.zeros((), jnp.int32), status, skip | ~finite | conv)
        st, iterations, status = iterate(self, _Row(d, tol), s0, self.max_iters)
        # the primal iterate rides along with the diagnostics (no gradient flows into it)
        return st.x, (NewtonInfo(status, st.gnorm, iterations), st.p)

    # ----- the iteration (driven by jaxens.solvers.base.iterate) -----
    def iterations(self, st: _State):
        return st.iteration

    def terminate(self, row: _Row, st: _State):
        return st.done

    def status(self, row: _Row, st: _State):
        """The status the step recorded (a rejected step ends the loop as ``MAX_ITERS``)."""
        return st.status

    def step(self, row: _Row, st: _State) -> _State:
        d, tol = row
        dtype = d.G.dtype
        eps = jnp.finfo(dtype).eps
        x, p = st.x, st.p
        r_c, r_d, w = self._residuals(d, p, x)
        w_safe = jnp.where(d.mask, w, 1.0)
        # [G^T diag(p/w) G + R^-1] dx = G^T (r_c / w) + r_d ;  dp = (r_c - p * G dx) / w
        H = gram(d.G, jnp.where(d.mask, p / w_safe, 0.0)) + jnp.diag(d.rinv)
        k = H.shape[0]
        hmax = jnp.maximum(jnp.max(jnp.diag(H)), jnp.finfo(dtype).tiny)
        lam = 100 * eps * hmax
        L = jnp.linalg.cholesky(H + lam * jnp.eye(k, dtype=dtype))
        rhs = (r_c / w_safe) @ d.G + r_d
        dx = chol_solve(L, rhs)
        dw = d.G @ dx
        dp = jnp.where(d.mask, (r_c - p * dw) / w_safe, 0.0)
        ok_dir = jnp.all(jnp.isfinite(dx)) & jnp.all(jnp.isfinite(dp))

        # fraction to the boundary of p > 0 and w = G x > 0 on the mask
        def t_to_boundary(val, dval):
            neg = d.mask & (dval < 0)
            return jnp.min(jnp.where(neg, -val / jnp.where(neg, dval, -1.0), jnp.inf))

        t_max = jnp.minimum(t_to_boundary(p, dp), t_to_boundary(w, dw))
        t0 = jnp.minimum(1.0, self.boundary_fraction * t_max).astype(dtype)
        merit0 = jnp.sum(r_c * r_c) + jnp.sum(r_d * r_d)

        def merit(t):
            rc, rd, _ = self._residuals(d, p + t * dp, x + t * dx)
            return jnp.sum(rc * rc) + jnp.sum(rd * rd)

        def ls_cond(c):
            t, j, ok = c
            return ~ok & (j < self.ls_max_steps)

        def ls_body(c):
            t, j, _ = c
            t = t * self.ls_shrink
            return t, j + 1, merit(t) <= (1 - 2 * self.armijo * t) * merit0

        t, _, ok = lax.while_loop(
            ls_cond, ls_body, (t0, jnp.zeros((), jnp.int32), merit(t0) <= (1 - 2 * self.armijo * t0) * merit0)
        )
        x_new = x + t * dx
        p_new = p + t * dp
        r_c, r_d, w_new = self._residuals(d, p_new, x_new)
        gnorm, cnorm = self._measures(r_c, r_d)
        finite = jnp.isfinite(gnorm) & jnp.isfinite(cnorm)
        interior = jnp.all(jnp.where(d.mask, (w_new > 0) & (p_new > 0), True))
        accept = ok & ok_dir & finite & interior
        new = _State(x_new, p_new, gnorm, st.iteration + 1, st.status, st.done)
        new = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, st)
        converged = accept & (gnorm <= tol) & (cnorm <= tol)
        status = jnp.where(
            converged, Status.SOLVED, jnp.where(~finite, Status.NUMERICAL_ERROR, Status.MAX_ITERS)
        ).astype(jnp.int32)
        return new._replace(iteration=st.iteration + 1, status=status, done=converged | ~accept)

    def solve(
        self, problem: BottleneckProblem, instance: MixtureCrossEntropy, warm: Float[Array, " k"] | None = None
    ) -> tuple[Solution, Float[Array, " k"]]:
        """Minimise ``-s . log p`` (+ soft) over the bottleneck set (one row; ``s`` is
        ``instance.weights``).

        Returns ``(solution, x)``; pass ``x`` as the next ``warm`` (a ``warm`` outside the
        domain ``G x > 0`` falls back to the cold start).
        """
        self.check_instance(instance)
        s, mask, m, rho = instance
        y0 = warm
        v, D = problem.A.shape
        k = num_dual(problem)
        dtype = problem.Q.dtype
        if s.shape != (v,):
            raise ValueError(f"s must have shape (v,) = ({v},) per row (vmap over the batch), got {s.shape}")
        if mask.shape != (v,) or mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be a bool array of shape ({v},), got {mask.dtype}{mask.shape}")
        if m.shape != (D,):
            raise ValueError(f"m must have shape (D,) = ({D},), got {m.shape}")
        rho = jnp.ones((problem.num_members,), dtype) if rho is None else jnp.asarray(rho, dtype)
        if rho.shape != (problem.num_members,):
            raise ValueError(f"rho must have shape (n,) = ({problem.num_members},), got {rho.shape}")
        cold = self.cold_start(problem, dtype)
        if y0 is None:
            y0 = cold
        if y0.shape != (k,):
            raise ValueError(f"warm must have shape (k,) = ({k},), got {y0.shape}; use cold_start(problem)")
        y0 = jnp.asarray(y0, dtype)
        return self._solve(problem, s, mask, m, rho, y0)

    @functools.partial(jax.jit, static_argnums=0)
    def _solve(self, problem, s, mask, m, rho, y0):
        D = problem.A.shape[1]
        k = num_dual(problem)
        dtype = problem.Q.dtype
        cold = self.cold_start(problem, dtype)
        bad = jnp.any(mask & ~jnp.isfinite(s)) | ~jnp.all(jnp.isfinite(m)) | ~jnp.any(mask)
        if problem.soft:
            bad = bad | ~jnp.all(jnp.isfinite(soft_cols_rho(problem, rho)))
        s_c = jnp.where(bad, jnp.ones_like(s), s)
        m_c = jnp.where(bad, 0.0, m)
        gx0 = problem.Q @ y0[: problem.rank]
        if problem.soft:
            gx0 = gx0 + problem.A_of(problem.soft) @ y0[problem.rank :]
        in_domain = jnp.all(jnp.where(mask, gx0 > 0, True)) & jnp.all(jnp.isfinite(y0))
        x0 = jnp.where(in_domain & ~bad, y0, cold)

        def forward(params, aux):
            return self._newton_loop(self._build(params[0], params[1], aux[0], params[2], params[3]), aux[1], aux[2])

        def residual(x, params, aux):
            d = self._build(params[0], params[1], aux[0], params[2], params[3])
            return self._grad(d, x, self._p(d, x)[0])

        def adjoint_solve(x, params, aux, xbar):
            d = self._build(params[0], params[1], aux[0], params[2], params[3])
            p, _ = self._p(d, x)
            w = jnp.where(d.mask, p * p / d.s, 0.0)
            H = gram(d.G, w) + jnp.diag(d.rinv)
            hmax = jnp.maximum(jnp.max(jnp.diag(H)), jnp.finfo(dtype).tiny)
            H = H + 10 * jnp.finfo(dtype).eps * hmax * jnp.eye(k, dtype=dtype)
            lam = jnp.linalg.solve(H, xbar[:, None])[:, 0]
            return jnp.where(jnp.all(jnp.isfinite(lam)), lam, 0.0)

        x, (info, p_iter) = implicit_root(forward, residual, adjoint_solve)((problem, s_c, m_c, rho), (mask, x0, bad))
        d = self._build(problem, s_c, mask, m_c, rho)
        p_x, _ = self._p(d, x)
        # Return the primal iterate, which satisfies the constraints to ``tol`` (the stopping
        # rule is on it); s / (G x) differs from it by r_c / (G x), large where G x is tiny.
        # The gradient is that of s / (G x*) (implicit adjoint).
        p_iter = jnp.where(jnp.all(jnp.isfinite(p_iter)), p_iter, p_x)
        p = p_x + lax.stop_gradient(p_iter - p_x)
        p = jnp.maximum(p, 0.0)
        total = jnp.sum(p)
        p = p / jnp.where(total > 0, total, 1.0)
        uniform = uniform_fallback(mask, dtype)
        valid = jnp.all(jnp.isfinite(p)) & (total > 0)
        status = jnp.where(~valid & ~bad, Status.NUMERICAL_ERROR, info.status).astype(jnp.int32)
        p = jnp.where(valid & ~bad, p, uniform)
        sol = Solution(
            p=p,
            status=status,
            primal_residual=problem.hard_residual(p, m_c.astype(dtype)),
            gap=info.gnorm.astype(dtype),
            iterations=info.iterations,
            certificate=jnp.zeros((D,), dtype),
            certificate_margin=jnp.zeros((), dtype),
        )
        x_out = jnp.where(bad | ~jnp.all(jnp.isfinite(x)), cold, lax.stop_gradient(x))
        return sol, x_out
