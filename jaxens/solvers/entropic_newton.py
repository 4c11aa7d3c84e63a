r"""Entropic bottleneck projection by damped Newton on the dual (and the LP by continuation).

Instances: :class:`~jaxens.solvers.instances.EntropicProgram` (``kl``, ``max_entropy``) and
:class:`~jaxens.solvers.instances.LinearProgram` (``sum_ce`` by entropic continuation).

Per row, with prior logits :math:`\theta` (``-inf`` or ``mask == False`` for tokens that must
get zero mass), hard constraints in the orthonormal basis :math:`Q^\top p = \beta`
(``problem.beta(m)``; this includes :math:`\mathbf 1^\top p = 1` since
:math:`\mathbf 1 \in \mathrm{span}\,Q`) and soft members :math:`S` with
:math:`A_S` = ``problem.A_of(problem.soft)``:

.. math::

   \min_{p \in \Delta_v,\ p_j = 0 \text{ off mask}}\ \mathrm{KL}\big(p \,\Vert\, \mathrm{softmax}_{\text{mask}}(\theta)\big)
     + \sum_{i \in S} \tfrac{\rho_i}{2} \lVert A_i^\top p - m_i \rVert^2
   \quad \text{s.t.} \quad Q^\top p = \beta .

``kl`` uses :math:`\theta = \sum_i w_i \log\hat p_i / \sum_i w_i` (:func:`jaxens.objectives.kl_prior`), so the
objective equals :math:`\sum_i w_i \mathrm{KL}(p\Vert\hat p_i)/\sum_i w_i` up to a constant;
``max_entropy`` uses :math:`\theta = 0`.

**Dual.**  With :math:`G = [Q,\ A_S] \in \mathbb R^{v\times k}`, :math:`z = (z_h, z_s)`,
:math:`b = (\beta, m_S)` and :math:`R^{-1} = \mathrm{blockdiag}(0, I/\rho_i)`, the Fenchel dual
is the smooth, convex, unconstrained problem

.. math::

   \min_z\ \varphi(z) = \operatorname{logsumexp}_{\text{mask}}(\theta + G z) - b^\top z
       + \tfrac12 z^\top R^{-1} z, \qquad p(z) = \mathrm{softmax}_{\text{mask}}(\theta + G z),

   \nabla\varphi = G^\top p - b + R^{-1} z, \qquad
   \nabla^2\varphi = G^\top(\mathrm{diag}\,p - p p^\top) G + R^{-1}.

(The soft part is the conjugate :math:`\tfrac\rho2\lVert w\rVert^2 = \max_u u^\top w -
\lVert u\rVert^2/(2\rho)` with :math:`u = -z_s`.)  The solution is
:math:`p^\star = p(z^\star)`: logit averaging corrected by a low-rank term in the members' own
embedding directions (Csiszár's I-projection; Finlayson's bottleneck feasible set).

**Algorithm.**  Damped Newton with a Levenberg term
:math:`(\nabla^2\varphi + \lambda I)\Delta = -\nabla\varphi`,
:math:`\lambda = \lambda_0\lVert\nabla\varphi\rVert_\infty + 100\,\epsilon_{\text{mach}}\max_i H_{ii}`
(the Hessian is singular along :math:`z_h \propto Q^\top\mathbf 1`, a shift of the logits,
along which the gradient vanishes), and Armijo backtracking on :math:`\varphi`.  The decrease
:math:`\varphi(z+t\Delta)-\varphi(z)` is evaluated *relative to the current point*,
:math:`\log\sum_j p_j e^{t e_j} + t\nabla\varphi^\top\Delta + \tfrac{t^2}2\Delta^\top R^{-1}\Delta`
with :math:`e = G\Delta - p^\top G\Delta` and ``expm1``-type evaluation, so the line search
still works at float32 round-off.  Stops when :math:`\lVert\nabla\varphi\rVert_\infty \le`
``tol``.  ``hessian_topk=K`` forms the Hessian from the ``K`` tokens of current largest mass
only (a PSD under-estimate; the step stays a descent direction and the line search keeps the
method globally convergent, at linear instead of quadratic local rate): ``O(K k^2)`` instead of
``O(v k^2)`` per step; keep ``K`` well above ``k`` (a subset of ``K < k`` tokens leaves the
estimate singular and the method crawls).  Each
iteration costs two ``v x k`` mat-vecs (``G\Delta`` for the line search, which also updates the
logits :math:`\theta + Gz`, and :math:`G^\top p` for the gradient).

**LP by continuation** (a :class:`~jaxens.solvers.instances.LinearProgram`).  For the LP
:math:`\min_p c^\top p + \sum_S \tfrac{\rho_i}2\lVert A_i^\top p - m_i\rVert^2` over the same
set, the entropic problem :math:`\min c^\top p - \varepsilon H(p) + \dots` is the problem above
with :math:`\theta = -c/\varepsilon`, :math:`\rho \to \rho/\varepsilon`, solved for a geometric
sequence :math:`\varepsilon_0 > \dots > \varepsilon_{\min}` (relative to the range of
:math:`c` on the mask), warm-starting :math:`z \leftarrow z\,\varepsilon_{k}/\varepsilon_{k+1}`
(the LP dual :math:`y = \varepsilon z` is what stays put).  As :math:`\varepsilon\to 0` the
entropic solutions converge to the *maximum-entropy point of the optimal face* of the LP
(Cominetti & San Martín, "Asymptotic analysis of the exponential penalty trajectory in linear
programming", Math. Prog. 1994), and the entropic solution is within
:math:`\varepsilon\log|\mathrm{supp}|\le\varepsilon\log v` of the LP optimum in objective.
``gap`` reports the true LP duality gap
:math:`c^\top p + \text{soft}(p) - [\min_{\text{mask}}(c + A_S u - Q y) + \beta^\top y - m_S^\top u
- \sum_S\lVert u_i\rVert^2/(2\rho_i)]` with :math:`y = \varepsilon z_h`, :math:`u = -\varepsilon z_s`
(valid as a bound when the hard residual is zero).

**Gradients.**  :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (default) differentiates :math:`p^\star` through the
dual optimality condition :math:`\nabla\varphi(z^\star) = 0` by the implicit function theorem
(:mod:`jaxens.solvers.implicit`): with respect to :math:`\theta` (hence member logits and
weights), :math:`m`, :math:`\rho`, :math:`c` and the array leaves of the problem (``A``,
``Q``, ``T_pinv``).  :class:`~jaxens.solvers.adjoint.UnrolledAdjoint` instead runs ``steps``
(default ``max_iters``) damped Newton steps
in a ``lax.fori_loop`` (backtracking over a fixed set of step sizes) and lets reverse mode go
through them.  For the LP only the final :math:`\varepsilon_{\min}` stage is differentiated
(the derivative of the entropic solution, which is what exists: the LP optimum is piecewise
constant in :math:`c`).

The Newton loop is :func:`jaxens.solvers.base.iterate`; the dual set-up and the Hessian are
shared with the cross-entropy solver (:mod:`jaxens.solvers.dual`).  Solvers are written per row;
``jax.vmap`` them over a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint, check_adjoint
from jaxens.solvers.base import AbstractIterativeSolver, iterate
from jaxens.solvers.dual import NewtonInfo, chol_solve, entropic_hessian, num_dual, uniform_fallback
from jaxens.solvers.entropic_dual import (
    EntropicDual,
    build_dual,
    dual_grad,
    dual_logp,
    log_mgf,
    lp_gap,
    nonfinite_input,
)
from jaxens.solvers.implicit import implicit_root
from jaxens.solvers.instances import EntropicProgram, LinearProgram
from jaxens.solvers.solution import Solution, Status

__all__ = ["EntropicNewton"]


class _State(NamedTuple):
    z: Float[Array, " k"]
    logp: Float[Array, " v"]
    g: Float[Array, " k"]
    gnorm: Float[Array, ""]
    iteration: Int[Array, ""]
    status: Int[Array, ""]
    done: Bool[Array, ""]


class _Row(NamedTuple):
    """What the Newton iteration closes over: the dual's data and the effective tolerance."""

    d: EntropicDual
    tol: Float[Array, ""]


# ----------------------------------------------------------------------------------------
# the solver
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EntropicNewton(AbstractIterativeSolver):
    r"""Damped Newton on the entropic dual (see the module docstring for the math).

    For ``EntropicProgram(theta, ...)`` it minimises the convex dual
    :math:`\phi(z) = \log\sum_j e^{\theta_j + (G z)_j} - z^\top b` (+ the soft terms), whose
    minimiser gives :math:`p = \mathrm{softmax}(\theta + G z)`, the KL projection of
    :math:`\mathrm{softmax}(\theta)` onto the bottleneck set; steps
    :math:`\delta = -(G^\top(\mathrm{diag}\,p - p p^\top)G)^{-1}\nabla\phi` with backtracking.

    Accepts :class:`~jaxens.solvers.instances.EntropicProgram` and
    :class:`~jaxens.solvers.instances.LinearProgram`; the warm start is the dual ``z`` (for the
    LP the LP dual estimate ``eps z``) returned by the previous call (:meth:`cold_start`: 0).

    Attributes:
      tol: stop when ``||grad phi||_inf <= tol``; ``None``: 1e-5 (float32) / 1e-10 (float64).
        The tolerance is raised to the round-off floor ``4 eps |theta|_inf |G|_max`` when that
        is larger (large logits, small ``eps`` of the LP continuation).
      max_iters: Newton steps per solve (per continuation stage for the LP).
      ls_max_steps: backtracking halvings before a step is declared failed.
      ls_shrink: step-size factor per backtracking step.
      armijo: sufficient-decrease constant ``c1``.
      levenberg: ``lambda_0`` of the Levenberg term ``lambda_0 ||grad||_inf``.
      hessian_topk: form the Hessian from the ``K`` tokens of largest mass (``None``: all).
      eps_start: first entropy weight of the LP continuation, relative to ``max c - min c``.
      eps_min: last entropy weight (relative); ``None``: 1e-3 (float32) / 1e-6 (float64).
      eps_decay: geometric factor between continuation stages.
      adjoint: :class:`~jaxens.solvers.adjoint.ImplicitAdjoint` (implicit function theorem) or
        :class:`~jaxens.solvers.adjoint.UnrolledAdjoint` (reverse mode through ``steps`` Newton
        steps, default ``max_iters``; the forward pass then runs exactly that many).
    """

    tol: float | None = None
    max_iters: int = 100
    ls_max_steps: int = 30
    ls_shrink: float = 0.5
    armijo: float = 1e-4
    levenberg: float = 1e-3
    hessian_topk: int | None = None
    eps_start: float = 1.0
    eps_min: float | None = None
    eps_decay: float = 0.1
    adjoint: AbstractAdjoint = ImplicitAdjoint()

    accepts: ClassVar[tuple[type, ...]] = (EntropicProgram, LinearProgram)

    def __post_init__(self):
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if not 0.0 < self.ls_shrink < 1.0:
            raise ValueError(f"Expected 0 < ls_shrink < 1, got {self.ls_shrink}")
        if not 0.0 < self.eps_decay < 1.0:
            raise ValueError(f"Expected 0 < eps_decay < 1, got {self.eps_decay}")
        if self.hessian_topk is not None and self.hessian_topk < 1:
            raise ValueError(f"hessian_topk must be a positive int or None, got {self.hessian_topk}")
        check_adjoint(self.adjoint)
        if self.tol is not None and self.tol <= 0:
            raise ValueError(f"tol must be positive, got {self.tol}")

    # ----- static helpers -----
    def _tol(self, dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5

    def _eps_schedule(self, dtype) -> np.ndarray:
        eps_min = self.eps_min
        if eps_min is None:
            eps_min = 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-3
        if eps_min > self.eps_start:
            raise ValueError(f"eps_min ({eps_min}) must be <= eps_start ({self.eps_start})")
        n = max(1, math.ceil(math.log(self.eps_start / eps_min) / math.log(1 / self.eps_decay) - 1e-9))
        return np.geomspace(self.eps_start, eps_min, n + 1) if n > 0 else np.array([eps_min])

    def cold_start(self, problem: BottleneckProblem, dtype=None) -> Float[Array, " k"]:
        """The cold-start dual ``z = 0`` (``k = r + D_S``), for warm-start carries."""
        return jnp.zeros((num_dual(problem),), dtype or problem.Q.dtype)

    # ----- Newton iteration (shared by both loops) -----
    def _direction(self, d: EntropicDual, p, g, gnorm, idx=None, pG=None):
        H = entropic_hessian(d.G, d.rinv, p, self.hessian_topk, idx, pG)
        k = H.shape[0]
        eps = jnp.finfo(H.dtype).eps
        hmax = jnp.maximum(jnp.max(jnp.diag(H)), jnp.finfo(H.dtype).tiny)
        lam = self.levenberg * gnorm + 100 * eps * hmax
        L = jnp.linalg.cholesky(H + lam * jnp.eye(k, dtype=H.dtype))
        delta = chol_solve(L, -g)
        fallback = -g / (hmax + lam)
        return jnp.where(jnp.all(jnp.isfinite(delta)), delta, fallback)

    def _decrease(self, d: EntropicDual, logp, p, g, delta, with_gd: bool = False):
        """``t -> phi(z + t delta) - phi(z)`` evaluated relative to ``z``, and the slope (and
        ``G delta`` on the mask with ``with_gd``: the logits move by ``t G delta``)."""
        gd = jnp.where(d.mask, d.G @ delta, 0.0)
        e = jnp.where(d.mask, gd - p @ gd, 0.0)
        slope = g @ delta
        quad = delta @ (d.rinv * delta)
        fn = lambda t: log_mgf(d, logp, p, e, t) + t * slope + 0.5 * t * t * quad  # noqa: E731
        return (fn, slope, gd) if with_gd else (fn, slope)

    def _effective_tol(self, d: EntropicDual):
        """``max(tol, 4 eps |theta|_inf |G|_max)``: the round-off floor of ``grad phi``."""
        eps = jnp.finfo(d.G.dtype).eps
        floor = 4 * eps * jnp.max(jnp.abs(d.theta)) * jnp.max(jnp.abs(d.G))
        return jnp.maximum(self._tol(d.G.dtype), lax.stop_gradient(floor))

    def _newton_loop(self, d: EntropicDual, z0, skip) -> tuple[Float[Array, " k"], NewtonInfo]:
        tol = self._effective_tol(d)
        logp = dual_logp(d, z0)
        g = dual_grad(d, z0, jnp.exp(logp))
        gnorm = jnp.max(jnp.abs(g))
        finite = jnp.isfinite(gnorm)
        status = jnp.where(
            skip,
            Status.NONFINITE_INPUT,
            jnp.where(~finite, Status.NUMERICAL_ERROR, jnp.where(gnorm <= tol, Status.SOLVED, Status.MAX_ITERS)),
        ).astype(jnp.int32)
        s0 = _State(z0, logp, g, gnorm, jnp.zeros((), jnp.int32), status, skip | ~finite | (gnorm <= tol))
        s, iterations, status = iterate(self, _Row(d, tol), s0, self.max_iters)
        return s.z, NewtonInfo(status, s.gnorm, iterations)

    # ----- the iteration (driven by jaxens.solvers.base.iterate) -----
    def iterations(self, s: _State):
        return s.iteration

    def terminate(self, row: _Row, s: _State):
        return s.done

    def status(self, row: _Row, s: _State):
        """The status the step recorded (a failed line search ends the loop as ``MAX_ITERS``)."""
        return s.status

    def step(self, row: _Row, s: _State) -> _State:
        d, tol = row
        p = jnp.exp(s.logp)
        # G^T p, the gradient's product (the top-k Hessian's tail term)
        delta = self._direction(d, p, s.g, s.gnorm, pG=s.g + d.b - d.rinv * s.z)
        dphi, slope, gd = self._decrease(d, s.logp, p, s.g, delta, with_gd=True)

        def ls_cond(c):
            t, j, ok = c
            return ~ok & (j < self.ls_max_steps)

        def ls_body(c):
            t, j, _ = c
            t = t * self.ls_shrink
            return t, j + 1, dphi(t) <= self.armijo * t * slope

        t0 = jnp.ones((), s.z.dtype)
        t, _, ok = lax.while_loop(ls_cond, ls_body, (t0, jnp.zeros((), jnp.int32), dphi(t0) <= self.armijo * slope))
        ok = ok & (slope < 0)
        z = s.z + t * delta
        # theta + G z moves by t G delta: one v x k mat-vec per iteration saved
        logp = jax.nn.log_softmax(jnp.where(d.mask, s.logp + t * gd, -jnp.inf))
        g = dual_grad(d, z, jnp.exp(logp))
        gnorm = jnp.max(jnp.abs(g))
        finite = jnp.isfinite(gnorm) & jnp.all(jnp.isfinite(z))
        accept = ok & finite
        new = _State(z, logp, g, gnorm, s.iteration + 1, s.status, s.done)
        new = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, s)
        new = new._replace(iteration=s.iteration + 1)
        converged = accept & (gnorm <= tol)
        status = jnp.where(
            converged, Status.SOLVED, jnp.where(~finite, Status.NUMERICAL_ERROR, Status.MAX_ITERS)
        ).astype(jnp.int32)
        # a failed line search (round-off floor) also ends the loop, as MAX_ITERS
        return new._replace(status=status, done=converged | ~accept)

    def _unrolled_loop(self, d: EntropicDual, z0, skip) -> tuple[Float[Array, " k"], NewtonInfo]:
        tol = self._effective_tol(d)
        n_steps = self.adjoint.num_steps(self.max_iters)
        ts = jnp.asarray(self.ls_shrink ** np.arange(self.ls_max_steps + 1), z0.dtype)

        def body(_, z):
            logp = dual_logp(d, z)
            p = jnp.exp(logp)
            g = dual_grad(d, z, p)
            gnorm = jnp.max(jnp.abs(g))
            delta = self._direction(d, p, g, gnorm)
            dphi, slope = self._decrease(d, logp, p, g, delta)
            ok = jax.vmap(dphi)(ts) <= self.armijo * ts * slope
            t = jnp.where(jnp.any(ok) & (slope < 0), ts[jnp.argmax(ok)], 0.0)
            z_new = z + lax.stop_gradient(t) * delta
            return jnp.where(skip | ~jnp.all(jnp.isfinite(z_new)), z, z_new)

        z = lax.fori_loop(0, n_steps, body, z0)
        g = dual_grad(d, z, jnp.exp(dual_logp(d, z)))
        gnorm = lax.stop_gradient(jnp.max(jnp.abs(g)))
        status = jnp.where(
            skip,
            Status.NONFINITE_INPUT,
            jnp.where(~jnp.isfinite(gnorm), Status.NUMERICAL_ERROR, jnp.where(gnorm <= tol, Status.SOLVED, Status.MAX_ITERS)),
        ).astype(jnp.int32)
        return z, NewtonInfo(status, gnorm, jnp.asarray(n_steps, jnp.int32))

    def _root(self, problem, theta, mask, m, rho, z0, skip):
        """``z*`` of the dual, differentiable in (problem, theta, m, rho) per ``adjoint``."""
        if isinstance(self.adjoint, UnrolledAdjoint):
            return self._unrolled_loop(build_dual(problem, theta, mask, m, rho), z0, skip)

        def forward(params, aux):
            d = build_dual(*params[:2], aux[0], *params[2:])
            return self._newton_loop(d, aux[1], aux[2])

        def residual(z, params, aux):
            d = build_dual(*params[:2], aux[0], *params[2:])
            return dual_grad(d, z, jnp.exp(dual_logp(d, z)))

        def adjoint_solve(z, params, aux, zbar):
            d = build_dual(*params[:2], aux[0], *params[2:])
            p = jnp.exp(dual_logp(d, z))
            H = entropic_hessian(d.G, d.rinv, p, None)
            # H is singular along u = (Q^T 1, 0) (a shift of the logits); zbar is orthogonal to
            # it when it comes from p, and H + s u u^T / |u|^2 maps u-perp to itself.
            u = jnp.concatenate([jnp.ones_like(p) @ d.G[:, : problem.rank], jnp.zeros_like(d.rinv[problem.rank :])])
            u = u / jnp.linalg.norm(u)
            hmax = jnp.maximum(jnp.max(jnp.diag(H)), jnp.finfo(H.dtype).tiny)
            eps = jnp.finfo(H.dtype).eps
            Hr = H + hmax * jnp.outer(u, u) + 10 * eps * hmax * jnp.eye(H.shape[0], dtype=H.dtype)
            lam = jnp.linalg.solve(Hr, zbar[:, None])[:, 0]
            return jnp.where(jnp.all(jnp.isfinite(lam)), lam, 0.0)

        root = implicit_root(forward, residual, adjoint_solve)
        return root((problem, theta, m, rho), (mask, z0, skip))

    # ----- validation -----
    def _check(self, problem, x, mask, m, rho, z0, name):
        v, D = problem.A.shape
        k = num_dual(problem)
        if x.shape != (v,):
            raise ValueError(f"{name} must have shape (v,) = ({v},) per row (vmap over the batch), got {x.shape}")
        if mask.shape != (v,) or mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be a bool array of shape ({v},), got {mask.dtype}{mask.shape}")
        if m.shape != (D,):
            raise ValueError(f"m must have shape (D,) = ({D},) (problem.moments of one row), got {m.shape}")
        if rho is None:
            rho = jnp.ones((problem.num_members,), problem.Q.dtype)
        rho = jnp.asarray(rho, problem.Q.dtype)
        if rho.shape != (problem.num_members,):
            raise ValueError(f"rho must have shape (n,) = ({problem.num_members},), got {rho.shape}")
        if z0 is None:
            z0 = jnp.zeros((k,), problem.Q.dtype)
        if z0.shape != (k,):
            raise ValueError(
                f"warm must have shape (k,) = ({k},) (rank {problem.rank} + soft columns), got {z0.shape}; "
                "use cold_start(problem) or the z returned by the previous call"
            )
        return rho, jnp.asarray(z0, problem.Q.dtype)

    def _solution(self, problem, mask, p, m, info, gap) -> Solution:
        D = problem.A.shape[1]
        status = info.status
        valid = jnp.all(jnp.isfinite(p))
        uniform = uniform_fallback(mask, p.dtype)
        use_uniform = ~valid | (status == Status.NONFINITE_INPUT)
        p = jnp.where(use_uniform, uniform, p)
        status = jnp.where(~valid & (status != Status.NONFINITE_INPUT), Status.NUMERICAL_ERROR, status)
        return Solution(
            p=p,
            status=status.astype(jnp.int32),
            primal_residual=problem.hard_residual(p, m.astype(p.dtype)),
            gap=gap.astype(p.dtype),
            iterations=info.iterations,
            certificate=jnp.zeros((D,), p.dtype),
            certificate_margin=jnp.zeros((), p.dtype),
        )

    # ----- the one entry -----
    def solve(
        self,
        problem: BottleneckProblem,
        instance: EntropicProgram | LinearProgram,
        warm: Float[Array, " k"] | None = None,
    ) -> tuple[Solution, Float[Array, " k"]]:
        """Solve one row; returns ``(solution, z)`` (pass ``z`` as the next ``warm``).

        :class:`~jaxens.solvers.instances.EntropicProgram`: the entropic projection of
        ``softmax_mask(theta)`` onto the bottleneck set; ``solution.gap`` is
        ``||grad phi||_inf`` at the returned point.

        :class:`~jaxens.solvers.instances.LinearProgram`: ``min c.p (+ soft)`` by entropic
        continuation; returns the entropic solution at :math:`\\varepsilon_{\\min}` (relative
        to the range of ``c`` on the mask), which approximates the maximum-entropy point of the
        LP's optimal face (Cominetti & San Martín 1994) with objective within
        :math:`\\varepsilon_{\\min}\\log|\\mathrm{supp}\\,p|` of the optimum.  ``z`` is the LP
        dual estimate :math:`(y, -u) = \\varepsilon z`, in the units of ``c``; ``solution.gap`` is
        the LP duality gap (module docstring).  Tokens with ``c = +inf`` are treated as masked.
        """
        self.check_instance(instance)
        if isinstance(instance, LinearProgram):
            c, mask, m, rho = instance
            rho, z0 = self._check(problem, c, mask, m, rho, warm, "c")
            return self._solve_lp(problem, c, mask, m, rho, z0)
        theta, mask, m, rho = instance
        rho, z0 = self._check(problem, theta, mask, m, rho, warm, "theta")
        return self._solve(problem, theta, mask, m, rho, z0)

    @functools.partial(jax.jit, static_argnums=0)
    def _solve(self, problem, theta, mask, m, rho, z0):
        skip = nonfinite_input(theta, mask, m, rho, problem)
        theta_c = jnp.where(skip, jnp.zeros_like(theta), theta)
        m_c = jnp.where(skip, 0.0, m)
        z, info = self._root(problem, theta_c, mask, m_c, rho, jnp.where(skip, 0.0, z0), skip)
        d = build_dual(problem, theta_c, mask, m_c, rho)
        p = jnp.exp(dual_logp(d, z))
        sol = self._solution(problem, mask, p, m, info, info.gnorm)
        z_out = jnp.where(skip | ~jnp.all(jnp.isfinite(z)), z0 * 0, lax.stop_gradient(z))
        return sol, z_out

    @functools.partial(jax.jit, static_argnums=0)
    def _solve_lp(self, problem, c, mask, m, rho, z0):
        dtype = problem.Q.dtype
        c = c.astype(dtype)
        mask_c = mask & (c < jnp.inf)
        skip = nonfinite_input(-c, mask_c, m, rho, problem) | jnp.any(mask & jnp.isnan(c))
        c_safe = jnp.where(mask_c & ~skip, c, 0.0)
        m_c = jnp.where(skip, 0.0, m)
        cs = lax.stop_gradient(c_safe)
        scale = jnp.max(jnp.where(mask_c, cs, -jnp.inf)) - jnp.min(jnp.where(mask_c, cs, jnp.inf))
        scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
        eps_rel = self._eps_schedule(dtype)
        eps_all = jnp.asarray(eps_rel, dtype) * scale
        y0 = jnp.where(skip, 0.0, z0)

        def stage(carry, eps):
            y, iters = carry
            d = build_dual(problem, -cs / eps, mask_c, lax.stop_gradient(m_c), lax.stop_gradient(rho) / eps)
            z, info = self._newton_loop(d, lax.stop_gradient(y) / eps, skip)
            return (z * eps, iters + info.iterations), None

        (y, iters), _ = lax.scan(stage, (y0, jnp.zeros((), jnp.int32)), eps_all[:-1])
        # the last stage is differentiable, including through the scale of c
        cm = jnp.where(mask_c, c_safe, 0.0)
        scale_d = jnp.max(jnp.where(mask_c, cm, -jnp.inf)) - jnp.min(jnp.where(mask_c, cm, jnp.inf))
        scale_d = jnp.where(jnp.isfinite(scale) & (scale_d > 0), scale_d, 1.0)
        eps = jnp.asarray(eps_rel[-1], dtype) * scale_d
        z, info = self._root(problem, -c_safe / eps, mask_c, m_c, rho / eps, y / eps, skip)
        info = info._replace(iterations=info.iterations + iters)
        d = build_dual(problem, -c_safe / eps, mask_c, m_c, rho / eps)
        p = jnp.exp(dual_logp(d, z))
        y_out = lax.stop_gradient(z) * eps
        gap = lp_gap(problem, d, cs, lax.stop_gradient(p), lax.stop_gradient(m_c), lax.stop_gradient(rho), y_out)
        sol = self._solution(problem, mask, p, m, info, gap)
        y_out = jnp.where(skip | ~jnp.all(jnp.isfinite(y_out)), 0.0, y_out)
        return sol, y_out
