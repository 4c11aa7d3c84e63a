r"""OSQP-style ADMM for the bottleneck QP / LP, and for the min-underestimation LP.

**Problem** (one row, :meth:`ADMM.solve`):

.. math::

    \min_p\ \tfrac12\lVert F^\top p\rVert^2 + c^\top p
        + \sum_{i\in S}\tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2
    \quad\text{s.t.}\quad Q^\top p = \beta,\quad 0 \le p \le u,

with ``Q`` the orthonormal basis of :math:`\mathrm{span}[A_H, \mathbf 1]` cached in the problem
(:math:`Q^\top p=\beta` is :math:`A_H^\top p = m_H,\ \mathbf 1^\top p = 1`) and :math:`u = 0` off
the mask (1, or given caps, on it).

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
:func:`jaxens.solvers.feasibility.least_squares`.

**Solution polishing** (OSQP's, Stellato et al. 2020, §4.3; ``polish=True``).  ADMM stops at
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

(:func:`~jaxens.solvers.fixed_point_adjoint.kkt_solve`: ``K + r`` unknowns with ``K <= cap``
gathered rows of ``Q`` and ``U``, equilibrated, regularised to a quasi-definite matrix and
factorised with partial pivoting in an XLA loop (no LAPACK call, which deadlocks on 8 virtual CPU
devices), iterative refinement).  For the LP (:math:`U` empty) at a non-degenerate
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

**Min-underestimation** (:meth:`ADMM.solve_ratio`): with :math:`r_j = \min_i \hat p_{ij}`,

.. math::  \min_{p,s}\ s \quad\text{s.t.}\quad Q^\top p = \beta,\ 0 \le p_j \le s\,r_j,

i.e. minimise :math:`\max_{i,j} p_j/\hat p_{ij}`.  Same splitting on :math:`(p, s)` (``s`` free in
the x-update); the z-update is the prox of :math:`s + \iota\{0\le p\le s r\}`: for fixed ``s``,
:math:`p = \mathrm{clip}(a, 0, s r)`, and ``s`` is the root of the monotone piecewise-linear
:math:`\omega + \rho(s-b) - \rho\sum_j r_j(a_j - s r_j)_+` (one sort over the breakpoints
:math:`a_j/r_j`).  ``s`` is internally rescaled by :math:`\kappa` (``ratio_scale``) so that
``s`` and ``p`` have comparable magnitude.

**Gradients.**  The loop runs on stopped inputs; gradients of ``p`` with respect to ``c``,
``F``, ``m``, ``rho`` and the problem's arrays (``A``, ``Q``, ``T_pinv``) come from
``adjoint``:

* ``"implicit"`` (default): :meth:`ADMM.solve` differentiates the KKT conditions on the
  returned support (:mod:`jaxens.solvers.fixed_point_adjoint`: one ``K x K`` eigendecomposition,
  ``K = k + D_S``, no iteration).  For the LP (``F`` empty, no soft members) the optimum is a
  vertex: the gradient is that of the basic solution (zero with respect to ``c``, non-zero with
  respect to ``m``), exact at a non-degenerate vertex; use ``EntropicNewton().solve_lp`` for a
  gradient that is smooth in ``c``.  :meth:`ADMM.solve_ratio` differentiates the basic solution of
  the min-underestimation LP at the returned active set (:func:`ratio_basis`; tokens within
  relative ``sqrt(eps)`` of the bound :math:`p_j = s r_j` count as at the bound).
* ``"unrolled"``: reverse mode through ``unroll_steps`` further ADMM iterations (fixed
  :math:`\rho`, no checks) started from the converged state; the forward value is the converged
  ``p`` either way.  The derivative iterates converge at ADMM's linear rate, so ``unroll_steps``
  must be of the order of the forward iteration count (``Solution.iterations``) for the two
  adjoints to agree (tested: 30,000 steps on rows that took ~17,000).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.fista import _check_row, column_weights, uniform_on
from jaxens.solvers.fixed_point_adjoint import basis_solution, free_indices, kkt_solve, support_adjoint
from jaxens.solvers.solution import Solution, Status


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


class ADMMState(NamedTuple):
    """ADMM iterates for one row.  For :meth:`ADMM.solve_ratio` the vectors have length
    ``v + 1`` (the last entry is the scaled ``s``).  ``polish`` is a :class:`PolishStatus`."""

    x: Float[Array, " n"]
    z: Float[Array, " n"]
    u: Float[Array, " n"]  # scaled dual (y = rho * u)
    rho: Float[Array, ""]
    iterations: Int[Array, ""]
    primal_residual: Float[Array, ""]
    dual_residual: Float[Array, ""]
    converged: Bool[Array, ""]
    polish: Int[Array, ""]


def ratio_prox_s(
    a: Float[Array, " v"], b: Float[Array, ""], r: Float[Array, " v"], rho, omega
) -> Float[Array, ""]:
    r"""``s`` part of :math:`\arg\min_{s\ge0,\ 0\le p\le s r}\ \omega s + \tfrac\rho2(\lVert p-a\rVert^2+(s-b)^2)`.

    :math:`\phi'(s) = \omega + \rho(s-b) - \rho\sum_j r_j (a_j - s r_j)_+` is increasing; with
    breakpoints :math:`t_j = a_j / r_j` sorted decreasingly, the active set on
    :math:`[t_{(K+1)}, t_{(K)}]` is the first ``K`` and the root is linear there.
    """
    dtype = a.dtype
    pos = r > 0
    t = jnp.where(pos, a / jnp.where(pos, r, 1.0), -1.0)  # r_j = 0: contributes nothing
    order = jnp.argsort(-t)
    ts, rs, as_ = t[order], r[order], a[order]
    cra = jnp.cumsum(rs * as_)
    crr = jnp.cumsum(rs * rs)
    # phi'(t_(k)) with the first k active (the k-th contributes 0 at its own breakpoint)
    dphi = omega + rho * (ts - b) - rho * (cra - ts * crr)
    K = jnp.sum(dphi > 0)  # root lies below the first K breakpoints
    sra = jnp.where(K > 0, cra[jnp.maximum(K - 1, 0)], 0.0)
    srr = jnp.where(K > 0, crr[jnp.maximum(K - 1, 0)], 0.0)
    s = (rho * b + rho * sra - omega) / (rho * (1.0 + srr))
    hi = jnp.where(K > 0, ts[jnp.maximum(K - 1, 0)], jnp.inf)
    lo = jnp.where(K < ts.shape[0], ts[jnp.minimum(K, ts.shape[0] - 1)], -jnp.inf)
    s = jnp.clip(s, lo, hi)
    return jnp.maximum(s, 0.0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class ADMM:
    """OSQP-style ADMM (see the module docstring for the math).

    Attributes:
      rho0: initial penalty :math:`\\rho`.
      alpha: over-relaxation in ``(0, 2)`` (OSQP uses 1.6).
      adaptive_rho: rescale :math:`\\rho` from the residual ratio at each check.
      tol_abs, tol_rel: OSQP absolute / relative tolerances (``None``: by the working dtype,
        ``1e-6 / 1e-5`` in float32 and bfloat16, ``1e-7 / 1e-6`` in float64).
      max_iters: iteration cap (``None``: 10,000 in float32, 50,000 in float64, whose tighter
        tolerances need more of ADMM's linearly converging tail).
      check_every: iterations between residual checks (and :math:`\\rho` updates).
      ratio_scale: :math:`\\kappa` for :meth:`solve_ratio` (``None``: ``0.01 sum(r) / |mask|``,
        an empirical choice: ``sum(r) / |mask|`` puts the lower bound ``1 / sum(r)`` of ``s``
        on the scale of ``p``; the extra 0.01 converged fastest on random instances); ``s`` is represented
        as ``s * kappa``.
      polish: active-set solution polishing (OSQP's, Stellato et al. 2020, §4.3; see the module
        docstring): guess the active set from the last iterate, solve the equality-constrained
        problem on the free tokens through its KKT system, keep the result only if it passes the
        KKT check.  Makes float32 answers exact (and reproducible) at the optimum's vertex /
        face.  Its outcome is ``state.polish`` (:class:`PolishStatus`).
      polish_refine: iterative-refinement steps of the polish's KKT solve.
      polish_rounds: the most KKT solves of the polish: the first on the active set guessed
        from the iterate, each further one after a one-token active-set correction (only while
        rejected).
      polish_delta: quasi-definite regularisation of the polish's (equilibrated) KKT matrix
        (``None``: ``1e-6`` in float32, ``1e-10`` in float64), removed by ``polish_refine``
        refinement steps; see :func:`~jaxens.solvers.fixed_point_adjoint.kkt_solve`.
      polish_cap: the most free tokens the polish accepts (``None``: ``2 (r + k)`` for
        :meth:`solve`, ``2 r`` for :meth:`solve_ratio`; a vertex has at most ``r``).  Its KKT
        solve factorises a matrix of size ``cap + r``.
      polish_max_size: the polish runs only when its KKT matrix (``cap + r``, static) has at most
        this size: its factorisation is a sequential loop (no LAPACK: batched LAPACK deadlocks on
        multi-device CPU meshes), too slow beyond a few hundred rows per row solved.  Larger problems
        (e.g. SmolLM2's 577 constraints at v = 49,152) return the ADMM iterate (``NOT_RUN``).
      polish_iters: CG steps of the fallback correction when the active-set polish is not
        accepted (0 disables it): ``z`` gets the scaled minimum-norm correction
        ``p = z - z * (Q y)``, ``Q^T Z Q y = Q^T z - beta``, which keeps its support and sign; it
        is kept only if it lowers the equality residual.
      rho_max: upper clip of the adaptive :math:`\\rho` (the lower clip is ``1e-6``).
      adjoint: ``"implicit"`` (KKT on the support / basic solution) or ``"unrolled"`` (reverse
        mode through ``unroll_steps`` ADMM iterations from the converged state); see the module
        docstring.  The forward value does not depend on it.  ``ub`` gets no gradient.
      unroll_steps: iterations of the unrolled adjoint.
    """

    rho0: float = 0.1
    alpha: float = 1.6
    adaptive_rho: bool = True
    tol_abs: float | None = None
    tol_rel: float | None = None
    max_iters: int | None = None
    check_every: int = 25
    ratio_scale: float | None = None
    rho_max: float = 1e8
    polish: bool = True
    polish_refine: int = 3
    polish_rounds: int = 10
    polish_delta: float | None = None
    polish_cap: int | None = None
    polish_iters: int = 50
    polish_max_size: int = 768
    adjoint: Literal["implicit", "unrolled"] = "implicit"
    unroll_steps: int = 2000

    def __post_init__(self):
        if not self.rho0 > 0:
            raise ValueError(f"Expected rho0 > 0, got {self.rho0}")
        if not 0 < self.alpha < 2:
            raise ValueError(f"Expected 0 < alpha < 2, got {self.alpha}")
        ta, tr = self.tolerances(jnp.float32)
        if not (ta >= 0 and tr >= 0 and ta + tr > 0):
            raise ValueError(f"Expected non-negative tolerances, got {self.tol_abs}, {self.tol_rel}")
        if self.adjoint not in ("implicit", "unrolled"):
            raise ValueError(f"adjoint must be 'implicit' or 'unrolled', got {self.adjoint!r}")
        if self.unroll_steps < 1:
            raise ValueError(f"Expected unroll_steps >= 1, got {self.unroll_steps}")
        if not ((self.max_iters is None or self.max_iters >= 1) and self.check_every >= 1):
            raise ValueError(
                f"Expected max_iters >= 1 and check_every >= 1, got {self.max_iters}, {self.check_every}"
            )

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(tol_abs, tol_rel)`` for the working ``dtype`` (explicit values win)."""
        wide = jnp.finfo(dtype).bits >= 64
        ta = self.tol_abs if self.tol_abs is not None else (1e-7 if wide else 1e-6)
        tr = self.tol_rel if self.tol_rel is not None else (1e-6 if wide else 1e-5)
        return ta, tr

    def polish_regularisation(self, dtype) -> float:
        """``polish_delta`` for the working ``dtype``."""
        if self.polish_delta is not None:
            return self.polish_delta
        return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-6

    def iteration_cap(self, dtype) -> int:
        """``max_iters`` for the working ``dtype``."""
        if self.max_iters is not None:
            return self.max_iters
        return 50000 if jnp.finfo(dtype).bits >= 64 else 10000

    def solve(
        self,
        problem: BottleneckProblem,
        c: Float[Array, " v"],
        F: Float[Array, "v k"],
        mask: Bool[Array, " v"],
        m: Float[Array, " D"],
        rho: Float[Array, " n"],
        x0: ADMMState | Float[Array, " v"] | None = None,
        ub: Float[Array, " v"] | None = None,
    ) -> tuple[Solution, ADMMState]:
        """Solve one row (``vmap`` for a batch).  ``x0``: a previous :class:`ADMMState` (full
        warm start, incl. dual and :math:`\\rho`) or a distribution ``p``.  ``ub``: optional caps."""
        return _admm_solve(self, problem, c, F, mask, m, rho, x0, ub)

    def solve_ratio(
        self,
        problem: BottleneckProblem,
        r: Float[Array, " v"],
        mask: Bool[Array, " v"],
        m: Float[Array, " D"],
        x0: ADMMState | None = None,
    ) -> tuple[Solution, ADMMState]:
        """Min-underestimation LP ``min s s.t. p feasible, 0 <= p <= s r`` for one row.

        ``r_j = min_i p_hat_ij``.  The optimal ``s`` is ``ratio_value(p, r)`` (see
        :meth:`ratio_value` evaluates ``max_j p_j / r_j`` of the returned ``p``);
        ``Solution.gap`` is the dual residual."""
        return _admm_ratio(self, problem, r, mask, m, x0)

    @staticmethod
    def ratio_value(p: Float[Array, "*B v"], r: Float[Array, "*B v"]) -> Float[Array, "*B"]:
        """The min-underestimation objective ``max_j p_j / r_j`` of a distribution ``p``."""
        return jnp.max(jnp.where(p > 0, p / jnp.where(r > 0, r, 1.0), 0.0) + jnp.where((p > 0) & (r <= 0), jnp.inf, 0.0), axis=-1)


def _loop(solver: ADMM, x_update, z_update, grad_norm, x, z, u, rho, L_extra):
    """Generic OSQP-style loop: ``x_update(z, u, rho, x_prev)``, ``z_update(w, rho)``."""
    dtype = x.dtype
    a = solver.alpha

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

    def body(s: ADMMState) -> ADMMState:
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

    def cond(s: ADMMState):
        return (s.iterations < solver.iteration_cap(s.primal_residual.dtype)) & ~s.converged & ~jnp.isnan(s.primal_residual)

    inf = jnp.asarray(jnp.inf, dtype)
    s0 = ADMMState(
        x, z, u, jnp.asarray(rho, dtype), jnp.zeros((), jnp.int32), inf, inf, jnp.zeros((), bool),
        jnp.asarray(PolishStatus.NOT_RUN, jnp.int32),
    )
    return jax.lax.while_loop(cond, body, s0)


def _polish(Q, beta, z, iters: int):
    r"""Scaled minimum-norm correction onto :math:`Q^\top p = \beta` keeping the support of ``z``:
    :math:`p = z - z\odot Qy` with :math:`(Q^\top Z Q)\,y = Q^\top z - \beta` (``iters`` CG steps,
    two ``v x r`` mat-vecs each); zero entries stay zero and small corrections keep ``p >= 0``."""
    b = Q.T @ z - beta
    mv = lambda y: Q.T @ (z * (Q @ y))  # noqa: E731
    y, _ = jax.scipy.sparse.linalg.cg(mv, b, maxiter=iters)
    return z - z * (Q @ y)


class _Polished(NamedTuple):
    """Result of an active-set polish: the point, its :class:`PolishStatus` and KKT violation."""

    p: Float[Array, " v"]
    status: Int[Array, ""]
    dual_violation: Float[Array, ""]


def _not_polished(p, dtype) -> _Polished:
    return _Polished(p, jnp.asarray(PolishStatus.NOT_RUN, jnp.int32), jnp.zeros((), dtype))


def _active_set_polish(solver: ADMM, Q, beta, lower, upper, free, cap, round_fn, ref_res, dist) -> _Polished:
    """Solve on the guessed active set, then up to ``polish_rounds - 1`` active-set corrections,
    one token each way per round as in an active-set method (moving every violator at once, as
    the primal-dual active-set method of Hintermüller, Ito & Kunisch 2002 does, diverged from
    guesses a token off): the free token farthest outside its box moves to the violated bound,
    and of the bound tokens with a wrong-signed reduced cost the one ADMM was least sure of
    (smallest ``dist``, its pre-clip distance to the bound; Dantzig's most-negative reduced cost
    picked wrong tokens) becomes free.  Stops at the first round that passes the KKT check (a
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
    return _Polished(best_p, status, viol_out.astype(dtype))


def _num_soft_cols(problem) -> int:
    return sum(problem.member_cols[i] for i in problem.soft)


def _polish_size(solver: ADMM, q_shape, k: int) -> int:
    """Static size ``cap + r`` of the polish's KKT matrix (shapes only)."""
    v, r = q_shape
    cap = min(2 * (r + k) if solver.polish_cap is None else solver.polish_cap, v)
    return cap + r


def _polish_qp(solver: ADMM, Q, beta, U, g0, mask, box, state: ADMMState) -> _Polished:
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
    return _active_set_polish(solver, Q, beta, lower, upper, free, cap, round_fn, ref_res, dist)


_RATIO_TIE = 1e-2
# Off (known gap): the min-underestimation LP's optimum is typically a vertex with ~r free tokens,
# but ADMM's final iterate (even SOLVED in float64) has a few more "free" tokens; its KKT system is
# then underdetermined in p and overdetermined in the dual, and the primal-dual active-set rounds
# cycle within 1-2 tokens of HiGHS's active set (on HiGHS's active set the KKT solve reproduces
# its vertex to 1e-16).  Finishing needs a simplex ratio-test step along the face (not written);
# solve_ratio returns the ADMM iterate (state.polish NOT_RUN).
_POLISH_RATIO = False


def _polish_ratio(solver: ADMM, Q, beta, r, kappa, mask, state: ADMMState) -> _Polished:
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
    upper = pos & ~lower & (a >= (1.0 - _RATIO_TIE) * s_sc * r / kappa)
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
    return _active_set_polish(solver, Q, beta, lower, upper, free, cap, round_fn, ref_res, jnp.abs(dist))


def _finish(problem, state, mask, m, finite_in, p_raw, dtype, polish_iters=0, Q=None, beta=None, polished=None):
    p_raw = jnp.where(mask, jnp.maximum(p_raw, 0.0), 0.0)
    if polish_iters:
        p_pol = jnp.where(mask, jnp.maximum(_polish(Q, beta, p_raw, polish_iters), 0.0), 0.0)
        res = lambda p: jnp.max(jnp.abs(Q.T @ p - beta))  # noqa: E731
        better = jnp.all(jnp.isfinite(p_pol)) & (res(p_pol) < res(p_raw))
        p_raw = jnp.where(better, p_pol, p_raw)
    if polished is None:
        polished = _not_polished(p_raw, dtype)
    accepted = polished.status == PolishStatus.ACCEPTED
    p_raw = jnp.where(accepted, polished.p, p_raw)
    tot = jnp.sum(p_raw)
    p = jnp.where(tot > 0, p_raw / jnp.where(tot > 0, tot, 1.0), uniform_on(mask, dtype))
    numerr = jnp.isnan(state.primal_residual)
    # an accepted polish is a KKT point within the tolerances: solved, whatever the loop reached
    status = jnp.where(state.converged | accepted, Status.SOLVED, Status.MAX_ITERS)
    status = jnp.where(numerr & ~accepted, Status.NUMERICAL_ERROR, status)
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


def _warm(x0, v, dtype, default):
    """(x, z, u, rho or None) from a warm start."""
    if x0 is None:
        return default, default, jnp.zeros_like(default), None
    if isinstance(x0, ADMMState):
        if x0.x.shape != default.shape:
            raise ValueError(f"warm-start state has vectors of shape {x0.x.shape}, expected {default.shape}")
        return x0.x.astype(dtype), x0.z.astype(dtype), x0.u.astype(dtype), x0.rho.astype(dtype)
    x0 = jnp.asarray(x0, dtype)
    if x0.shape != default.shape:
        raise ValueError(f"x0 must be an ADMMState or a vector of shape {default.shape}, got {x0.shape}")
    return x0, x0, jnp.zeros_like(x0), None


def _qp_ops(problem: BottleneckProblem, c, F, mask, m, rho_s, box):
    """The x-/z-updates of the QP/LP splitting for one row (built from live or stopped data)."""
    dtype = problem.A.dtype
    Q, A = problem.Q, problem.A
    beta = problem.beta(m)
    xb = Q @ beta  # min-norm point of the affine set
    k = F.shape[1]
    if k:
        G = F - Q @ (Q.T @ F)
        lam, V = jnp.linalg.eigh(G.T @ G)
        GV = G @ V
        FFxb = F @ (F.T @ xb)
    soft = bool(problem.soft)
    if soft:
        w_cols = column_weights(problem, rho_s, jnp.zeros((), dtype))
        soft_idx = np.asarray(problem.soft, np.int64)
        L_S = jnp.sum(rho_s[soft_idx] * problem.lipschitz_members[soft_idx])
    else:
        L_S = jnp.zeros((), dtype)

    def proj_perp(y):
        return y - Q @ (Q.T @ y)

    def x_update(z, u, rho, x_prev):
        lin = c
        if soft:
            lin = lin + A @ (w_cols * (x_prev @ A - m))
        rp = rho + L_S
        w = (rho * (z - u) + L_S * x_prev - lin) / rp
        if not k:
            return xb + proj_perp(w)
        b = proj_perp(rp * w - FFxb)
        xp = (b - GV @ ((GV.T @ b) / (rp + lam))) / rp
        return xb + xp

    def z_update(w, rho):
        return jnp.clip(w, 0.0, box)

    def grad_norm(x):
        g = c
        if k:
            g = g + F @ (F.T @ x)
        return jnp.max(jnp.abs(g))

    return x_update, z_update, grad_norm, L_S, beta


def _qp_grad(p, params):
    """``grad f(p) = F F^T p + c + A (w * (A^T p - m))`` of the ADMM objective (soft ``w``)."""
    problem, c, F, m, rho_s = params
    g = F @ (F.T @ p) + c
    if problem.soft:
        w = column_weights(problem, rho_s, jnp.zeros((), p.dtype))
        g = g + problem.A @ (w * (p @ problem.A - m))
    return g


def _qp_eq(params):
    problem, _, _, m, _ = params
    return problem.Q, problem.beta(m)


def _qp_factor(params):
    """``U`` with ``U U^T`` the Hessian: ``[F, sqrt(rho_i) A_i for soft i]``."""
    problem, _, F, _, rho_s = params
    if not problem.soft:
        return F
    cols = problem.columns(problem.soft)
    w = column_weights(problem, rho_s, jnp.zeros((), F.dtype))[cols]
    return jnp.concatenate([F, problem.A[:, cols] * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]], axis=1)


_qp_attach = support_adjoint(_qp_grad, _qp_eq, _qp_factor)


def _unrolled_tail(solver: ADMM, x_update, z_update, state: ADMMState, steps: int):
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


def _normalise(z, mask):
    z = jnp.where(mask, jnp.maximum(z, 0.0), 0.0)
    tot = jnp.sum(z)
    return z / jnp.where(tot > 0, tot, 1.0)


def _straight_through(value, diff):
    """``value`` forward, the gradient of ``diff`` backward."""
    return jax.lax.stop_gradient(value) + diff - jax.lax.stop_gradient(diff)


@functools.partial(jax.jit, static_argnames=("solver",))
def _admm_solve(solver: ADMM, problem: BottleneckProblem, c, F, mask, m, rho, x0, ub):
    dtype = problem.A.dtype
    c, F, m = (jnp.asarray(a, dtype) for a in (c, F, m))
    mask = jnp.asarray(mask, bool)
    rho_s = jnp.asarray(rho, dtype)
    _check_row(problem, c, F, mask, m, rho_s)
    v = problem.vocab_size
    finite_in = (
        jnp.all(jnp.isfinite(jnp.where(mask, c, 0.0)))
        & jnp.all(jnp.isfinite(jnp.where(mask[:, None], F, 0.0)))
        & jnp.all(jnp.isfinite(m))
        & jnp.all(jnp.isfinite(rho_s))
    )
    c = jnp.where(mask & jnp.isfinite(c), c, 0.0)
    F = jnp.where(jnp.isfinite(F) & mask[:, None], F, 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    rho_s = jnp.where(jnp.isfinite(rho_s), rho_s, 0.0)
    if ub is None:
        box = mask.astype(dtype)
    else:
        ub = jnp.asarray(ub, dtype)
        if ub.shape != (v,):
            raise ValueError(f"ub must have shape ({v},), got {ub.shape}")
        finite_in &= jnp.all(jnp.isfinite(jnp.where(mask, ub, 0.0)))
        box = jnp.where(mask & jnp.isfinite(ub), jnp.maximum(ub, 0.0), 0.0)
    box = jax.lax.stop_gradient(box)

    # The loop sees no tangents: gradients come from the adjoint below.
    params = (problem, c, F, m, rho_s)
    prob_ng, c_ng, F_ng, m_ng, rho_ng = jax.lax.stop_gradient(params)
    x_update, z_update, grad_norm, L_S, beta = _qp_ops(prob_ng, c_ng, F_ng, mask, m_ng, rho_ng, box)

    default = uniform_on(mask, dtype)
    x, z, u, rho0 = _warm(x0, v, dtype, default)
    x, z, u = jax.lax.stop_gradient((x, z, u))
    rho0 = jnp.asarray(solver.rho0, dtype) if rho0 is None else jax.lax.stop_gradient(rho0)
    state = _loop(solver, x_update, z_update, grad_norm, x, z, u, rho0, L_S)
    polished = None
    if solver.polish and _polish_size(solver, prob_ng.Q.shape, F_ng.shape[1] + _num_soft_cols(prob_ng)) <= solver.polish_max_size:
        p_ng = (prob_ng, c_ng, F_ng, m_ng, rho_ng)
        U, g0 = _qp_factor(p_ng), _qp_grad(jnp.zeros((v,), dtype), p_ng)
        polished = _polish_qp(solver, prob_ng.Q, beta, U, jnp.where(mask, g0, 0.0), mask, box, state)
    sol, state = _finish(
        prob_ng, state, mask, m_ng, finite_in, state.z, dtype, solver.polish_iters, prob_ng.Q, beta, polished
    )
    p = sol.p
    if solver.adjoint == "implicit":
        free = (mask & (p > 0) & (p < box)).astype(dtype)
        p_d = _qp_attach(p, params, free, jnp.where(free > 0, 0.0, p))
    else:
        xu, zu, _, _, _ = _qp_ops(problem, c, F, mask, m, rho_s, box)
        p_d = _straight_through(p, _normalise(_unrolled_tail(solver, xu, zu, state, solver.unroll_steps), mask))
    sol = sol._replace(p=jnp.where(finite_in, p_d, p))
    return sol, jax.lax.stop_gradient(state)


def _ratio_ops(problem: BottleneckProblem, r, m, omega):
    v = problem.vocab_size
    Q = problem.Q
    xb = Q @ problem.beta(m)

    def x_update(z, u, rho, x_prev):
        w = z - u
        wp = w[:v]
        return jnp.concatenate([xb + wp - Q @ (Q.T @ wp), w[v:]])

    def z_update(w, rho):
        a, b = w[:v], w[v]
        s = ratio_prox_s(a, b, r, rho, omega)
        return jnp.concatenate([jnp.clip(a, 0.0, s * r), s[None]])

    return x_update, z_update


def ratio_basis(problem: BottleneckProblem, p, r, m, mask, tie_rtol: float | None = None):
    r"""The basic solution of the min-underestimation LP at the active set of ``p`` (differentiable).

    With :math:`s = \max_j p_j/r_j`, the tokens at the bound :math:`U = \{p_j \ge s r_j(1-\delta)\}`
    and the free ones :math:`F = \{p_j > 0\}\setminus U`, the vertex solves
    :math:`Q_F^\top x_F + s\,Q_U^\top r_U = \beta(m)` in the unknowns :math:`(x_F, s)`
    (square and non-singular at a non-degenerate vertex, :math:`|F| + 1 = r`); it is computed as
    the minimum-norm solution :func:`~jaxens.solvers.fixed_point_adjoint.basis_solution` and
    :math:`p = x_F + s\,r_U`.  ``delta`` (``tie_rtol``) is ``sqrt(eps)`` of the dtype.
    """
    dtype = p.dtype
    delta = float(np.sqrt(np.finfo(dtype).eps)) if tie_rtol is None else tie_rtol
    pn, rn = jax.lax.stop_gradient((p, r))
    pos = mask & (pn > 0) & (rn > 0)
    t = jnp.where(pos, pn / jnp.where(pos, rn, 1.0), 0.0)
    s = jnp.max(t)
    at = pos & (t >= s * (1.0 - delta))
    fr = (mask & (pn > 0) & ~at).astype(dtype)
    ur = jnp.where(at, r, 0.0)
    Q = problem.Q
    B = jnp.concatenate([(Q * fr[:, None]).T, (ur @ Q)[:, None]], axis=1)
    xs = basis_solution(B, problem.beta(m))
    return fr * xs[:-1] + xs[-1] * ur


@functools.partial(jax.jit, static_argnames=("solver",))
def _admm_ratio(solver: ADMM, problem: BottleneckProblem, r, mask, m, x0):
    dtype = problem.A.dtype
    v, D = problem.A.shape
    r = jnp.asarray(r, dtype)
    m = jnp.asarray(m, dtype)
    mask = jnp.asarray(mask, bool)
    if r.shape != (v,) or mask.shape != (v,) or m.shape != (D,):
        raise ValueError(
            f"solve_ratio expects r ({v},), mask ({v},), m ({D},) for one row; got "
            f"{r.shape}, {mask.shape}, {m.shape}"
        )
    finite_in = jnp.all(jnp.isfinite(jnp.where(mask, r, 0.0))) & jnp.all(jnp.isfinite(m))
    r = jnp.where(mask & jnp.isfinite(r), jnp.maximum(r, 0.0), 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    r_live, m_live = r, m
    problem_ng, r, m = jax.lax.stop_gradient((problem, r, m))
    if solver.ratio_scale is None:  # see the ratio_scale doc
        kappa = 0.01 * jnp.maximum(jnp.sum(r), jnp.finfo(dtype).tiny) / jnp.maximum(jnp.sum(mask), 1)
    else:
        kappa = jnp.asarray(solver.ratio_scale, dtype)
    r = r / kappa  # p <= (s kappa) (r / kappa)
    omega = 1.0 / kappa  # objective s = sigma / kappa
    Q = problem_ng.Q
    beta = problem_ng.beta(m)
    x_update, z_update = _ratio_ops(problem_ng, r, m, omega)

    def grad_norm(x):
        return jnp.asarray(omega, dtype)

    p_init = uniform_on(mask, dtype)
    s_init = jnp.max(p_init / jnp.where(r > 0, r, jnp.inf))
    s_init = jnp.where(jnp.isfinite(s_init), s_init, 1.0)
    default = jnp.concatenate([p_init, s_init[None]])
    x, z, u, rho0 = _warm(x0, v + 1, dtype, default)
    x, z, u = jax.lax.stop_gradient((x, z, u))
    rho0 = jnp.asarray(solver.rho0, dtype) if rho0 is None else jax.lax.stop_gradient(rho0)
    state = _loop(solver, x_update, z_update, grad_norm, x, z, u, rho0, jnp.zeros((), dtype))
    polished = None
    if solver.polish and _POLISH_RATIO:
        polished = _polish_ratio(solver, Q, beta, r * kappa, kappa, mask, state)
    sol, state = _finish(problem_ng, state, mask, m, finite_in, state.z[:v], dtype, solver.polish_iters, Q, beta, polished)
    p = sol.p
    if solver.adjoint == "implicit":
        p_d = _straight_through(p, ratio_basis(problem, p, r_live, m_live, mask))
    else:
        xu, zu = _ratio_ops(problem, r_live / kappa, m_live, omega)
        zt = _unrolled_tail(solver, xu, zu, state, solver.unroll_steps)
        p_d = _straight_through(p, _normalise(zt[:v], mask))
    sol = sol._replace(p=jnp.where(finite_in, p_d, p))
    return sol, jax.lax.stop_gradient(state)
