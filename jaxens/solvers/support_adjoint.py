r"""Implicit adjoint of a projected-gradient fixed point on the bottleneck polytope.

The ADMM and FISTA solvers return a minimiser :math:`p^\star(\theta)` of a convex quadratic

.. math::  f(p;\theta) = \tfrac12 p^\top H p + g_0(\theta)^\top p,\qquad H = UU^\top
           \ (U = [F,\ A\,\mathrm{diag}(\sqrt{w})],\ \text{``v x K``})

over :math:`\{p \ge 0 \text{ (on the mask, optionally } p\le u),\ E^\top p = e\}` with
:math:`E = Q,\ e = \beta(m)` (the hard constraints of ADMM; :math:`\mathbf 1\in\mathrm{span}\,Q`)
or :math:`E = \mathbf 1,\ e = 1` (the simplex of FISTA).  Here :math:`\theta` collects
``c``, ``F``, ``m``, ``rho`` (and the array leaves of the problem: ``A``, ``Q``, ``T_pinv``).

**Fixed point.**  Let :math:`D = \mathrm{diag}(s)` with :math:`s_j = 1` on the free support
:math:`\{0 < p^\star_j < u_j\}` (taken from the solver's output and held fixed: strict
complementarity, i.e. a non-degenerate optimum, makes it locally constant) and :math:`b` the
fixed values (0 or the cap) elsewhere.  The projection onto the face's affine hull is

.. math::  P(y) = b + D\bigl(y - E M^{+}(E^\top D y + E^\top b - e)\bigr), \qquad M = E^\top D E,

and the KKT conditions on the support are exactly :math:`R(p,\theta) = p - P(p - \nabla_p f(p;\theta)) = 0`
(on the support :math:`\nabla f + E\nu = 0`, :math:`E^\top p = e`; off it :math:`p = b`): the
fixed point of projected gradient :math:`p = P_{\mathcal C}(p - \eta\nabla f)` with the active
set frozen (``eta = 1`` without loss of generality).

**Adjoint.**  :math:`\partial_p R = I - \Pi(I - H)` with the symmetric projector
:math:`\Pi = D - DEM^{+}E^\top D` onto the tangent space of the face.  For a cotangent
:math:`\bar p`, :math:`(\partial_p R)^\top\lambda = \bar p` is solved as follows: with
:math:`\mu = \Pi\lambda` it reduces to the reduced KKT system
:math:`\Pi H \Pi\,\mu = \Pi\bar p`, :math:`\mu\in\mathrm{range}\,\Pi`, then
:math:`\lambda = \bar p + (I - H)\mu`, and :math:`\bar\theta = (\partial_\theta P(p - \nabla f))^\top\lambda`
(one VJP, :func:`jaxens.solvers.implicit.implicit_root`).  Since :math:`\Pi H\Pi = YY^\top` with
:math:`Y = \Pi U` (``v x K``), the reduced system is solved **directly** and matrix-free in ``v``:
:math:`\mu = Y\,V\Lambda^{-2}V^\top Y^\top\Pi\bar p` from the eigendecomposition
:math:`Y^\top Y = V\Lambda V^\top` (``K x K``), eigenvalues below ``rcond * ||U||_F^2`` dropped
(``rcond = 1e-12`` in float64, ``1e-6`` in float32): the minimum-norm (pseudo-inverse) solution.
Cost: ``O(v K (K + r))`` once per backward pass, no iteration, no tolerance beyond ``rcond``.

It is the exact derivative when the optimum is unique and non-degenerate (the reduced Hessian
:math:`\Pi H\Pi` is non-singular on the tangent space of the face, and no active bound is
weakly active).  Special cases:

* **LP** (``sum_ce`` with ADMM: :math:`H = 0`): at a non-degenerate vertex :math:`\Pi = 0`
  (:math:`|S| = r` and :math:`E_S` is square, non-singular), so :math:`\lambda = \bar p` and
  the gradient is the derivative of the basic solution :math:`E_S^\top p_S = e`: zero with
  respect to the cost ``c`` (the vertex is piecewise constant in ``c``), non-zero with respect
  to ``m`` (hence the member logits) and ``A``.  On a face of optima (:math:`\Pi\ne 0`) the LP
  solution is not differentiable; the formula then returns the derivative of the solver's point
  along the face's affine hull with the face directions left out (:math:`\mu = 0`).  For a
  smooth LP gradient use ``EntropicNewton`` on the ``LinearProgram`` (the entropic path).
* **QP with a face of optima** (``sum_sq_ce`` when :math:`|S| - r > \mathrm{rank}\,F`): the
  pseudo-inverse picks the minimum-norm :math:`\mu`; the result is the derivative of the
  solver's selection only up to that choice (the unrolled adjoint may differ).

Same construction as jaxopt's ``projected_gradient`` fixed-point implicit differentiation
(Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022), specialised to
a frozen active set and a low-rank Hessian, so nothing of size ``v x v`` is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxens.solvers.implicit import implicit_root

__all__ = ["face_projection", "support_adjoint", "basis_solution", "free_indices", "kkt_solve"]


def _pinv_psd(M: Float[Array, "q q"], rcond: float) -> Float[Array, "q q"]:
    lam, V = jnp.linalg.eigh(M)
    top = jnp.maximum(jnp.max(jnp.abs(lam)), jnp.finfo(M.dtype).tiny)
    inv = jnp.where(lam > rcond * top, 1.0 / jnp.where(lam > rcond * top, lam, 1.0), 0.0)
    return (V * inv[None, :]) @ V.T


def default_rcond(dtype) -> float:
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def face_projection(
    y: Float[Array, " v"],
    E: Float[Array, "v q"],
    e: Float[Array, " q"],
    free: Float[Array, " v"],
    fixed: Float[Array, " v"],
) -> Float[Array, " v"]:
    r""":math:`P(y) = b + D(y - E M^{+}(E^\top D y + E^\top b - e))` (see the module docstring).

    ``free`` is the 0/1 indicator ``s`` of the free support, ``fixed`` the values ``b`` off it.
    ``M^+`` is ``jnp.linalg.pinv`` (differentiable while the rank of ``M`` is constant).
    """
    DE = E * free[:, None]
    M = E.T @ DE
    rhs = DE.T @ y + E.T @ fixed - e
    corr = jnp.linalg.pinv(M, hermitian=True) @ rhs
    return fixed + free * y - DE @ corr


def support_adjoint(
    grad_fn: Callable[[Float[Array, " v"], Any], Float[Array, " v"]],
    eq_fn: Callable[[Any], tuple[Float[Array, "v q"], Float[Array, " q"]]],
    hess_factor_fn: Callable[[Any], Float[Array, "v K"]],
) -> Callable[[Float[Array, " v"], Any, Float[Array, " v"], Float[Array, " v"]], Float[Array, " v"]]:
    """Attach the implicit adjoint to a solver's output ``p``.

    Args:
      grad_fn: ``grad_fn(p, params) -> grad_p f`` (affine in ``p``; differentiable in ``params``).
      eq_fn: ``eq_fn(params) -> (E, e)``: the equality constraints ``E^T p = e``.
      hess_factor_fn: ``hess_factor_fn(params) -> U`` with ``H = U U^T`` (``K`` may be 0).

    Returns:
      ``attach(p, params, free, fixed) -> p`` whose value is ``p`` (the solver's output, no
      gradient flows into it) and whose VJP with respect to ``params`` is the implicit one.
      ``free`` (0/1 floats) and ``fixed`` describe the active set (see the module docstring).
    """

    def forward(params, aux):
        p, _, _ = aux
        return p, ()

    def residual(p, params, aux):
        _, free, fixed = aux
        E, e = eq_fn(params)
        return p - face_projection(p - grad_fn(p, params), E, e, free, fixed)

    def adjoint_solve(p, params, aux, pbar):
        _, free, fixed = aux
        E, _ = eq_fn(params)
        U = hess_factor_fn(params)
        rcond = default_rcond(p.dtype)
        DE = E * free[:, None]
        Minv = _pinv_psd(E.T @ DE, rcond)

        def proj(x):  # Pi x = D x - D E M^+ E^T D x (x: (v,) or (v, K))
            Dx = free.reshape((-1,) + (1,) * (x.ndim - 1)) * x
            return Dx - DE @ (Minv @ (DE.T @ x))

        b = proj(pbar)
        if U.shape[1] == 0:
            mu = jnp.zeros_like(pbar)
            Hmu = mu
        else:
            Y = proj(U)
            lam, V = jnp.linalg.eigh(Y.T @ Y)
            # relative to ||U||_F^2 >= lambda_max(U^T U) >= lambda_max(Y^T Y): at a vertex Y is
            # round-off (Pi = 0 up to rounding) and must be treated as zero, not rescaled
            top = jnp.maximum(jnp.sum(U * U), jnp.finfo(lam.dtype).tiny)
            ok = lam > rcond * top
            inv2 = jnp.where(ok, 1.0 / jnp.where(ok, lam, 1.0) ** 2, 0.0)
            a = V @ (inv2 * (V.T @ (Y.T @ b)))
            mu = Y @ a
            Hmu = U @ (U.T @ mu)
        out = pbar + mu - Hmu
        return jnp.where(jnp.all(jnp.isfinite(out)), out, 0.0)

    root = implicit_root(forward, residual, adjoint_solve)

    def attach(p, params, free, fixed):
        p = jax.lax.stop_gradient(p)
        out, _ = root(params, (p, jax.lax.stop_gradient(free), jax.lax.stop_gradient(fixed)))
        return out

    return attach


def basis_solution(
    B: Float[Array, "q n"], rhs: Float[Array, " q"], rcond: float | None = None
) -> Float[Array, " n"]:
    r"""Minimum-norm solution :math:`x = B^\top (BB^\top)^{+} \mathrm{rhs}` (differentiable).

    ``B`` is a dense masked basis matrix (zero columns off the basis).  At a non-degenerate
    vertex ``B`` restricted to its non-zero columns is square and non-singular, and ``x`` is the
    basic solution; autodiff gives its derivative.
    """
    rcond = default_rcond(B.dtype) if rcond is None else rcond
    G = B @ B.T
    return B.T @ (jnp.linalg.pinv(G, hermitian=True, rtol=rcond) @ rhs)


def free_indices(free: Float[Array, " v"], cap: int) -> tuple[Array, Float[Array, " K"]]:
    """Indices of the first ``cap`` free tokens (increasing order) and their 0/1 validity.

    Static shape ``(cap,)``: when fewer than ``cap`` tokens are free, the remaining slots hold
    non-free indices with validity 0 (the caller pins them); when more are free the caller must
    not use the result (compare ``sum(free)`` with ``cap``).
    """
    v = free.shape[0]
    j = jnp.arange(v, dtype=jnp.float32)
    key = jnp.where(free > 0, 2.0 * v - j, v - j)  # free tokens first, each group by index
    _, idx = jax.lax.top_k(key, cap)
    return idx, (free[idx] > 0).astype(free.dtype)


def _lu_factor(M: Float[Array, "n n"]) -> tuple[Float[Array, "n n"], Array]:
    """Gaussian elimination with partial pivoting: ``(LU, perm)`` with ``M[perm] = L U``.

    Written as an XLA loop, not a LAPACK custom call (batched LAPACK kernels share one thread
    pool across virtual CPU devices).
    """
    n = M.shape[0]
    ar = jnp.arange(n)

    def step(k, carry):
        LU, perm = carry
        piv = jnp.argmax(jnp.where(ar >= k, jnp.abs(LU[:, k]), -1.0))
        rows = jnp.where(ar == k, piv, jnp.where(ar == piv, k, ar))
        LU, perm = LU[rows], perm[rows]
        below = ar > k
        l = jnp.where(below, LU[:, k] / LU[k, k], 0.0)
        LU = LU - jnp.outer(l, jnp.where(ar > k, LU[k], 0.0))
        return LU.at[:, k].set(jnp.where(below, l, LU[:, k])), perm

    return jax.lax.fori_loop(0, n, step, (M, ar))


def _lu_solve(LU, perm, b):
    y = jax.lax.linalg.triangular_solve(LU, b[perm][:, None], left_side=True, lower=True, unit_diagonal=True)
    return jax.lax.linalg.triangular_solve(LU, y, left_side=True, lower=False)[:, 0]


def kkt_solve(
    U: Float[Array, "K k"],
    g: Float[Array, " K"],
    E: Float[Array, "K r"],
    e: Float[Array, " r"],
    valid: Float[Array, " K"],
    delta: float,
    refine: int,
) -> tuple[Float[Array, " K"], Float[Array, " r"]]:
    r"""Solve the KKT system of an equality-constrained QP on a free set (OSQP's polish algebra).

    .. math::  \min_x\ \tfrac12\lVert U^\top x\rVert^2 + g^\top x \quad\text{s.t.}\quad E^\top x = e
       \qquad\Longleftrightarrow\qquad
       M\begin{bmatrix} x \\ \nu\end{bmatrix} = \begin{bmatrix} -g \\ e\end{bmatrix},\quad
       M = \begin{bmatrix} UU^\top & E \\ E^\top & 0\end{bmatrix}

    (``K + r`` unknowns; entries with ``valid = 0`` are pinned to 0).  As in OSQP's solution
    polishing (Stellato et al. 2020, §4.3): ``M`` is equilibrated symmetrically (two Ruiz passes,
    :math:`\tilde M = DMD`), the quasi-definite :math:`\tilde M + \mathrm{diag}(\delta I,
    -\delta I)` is factorised once (partial pivoting, an XLA loop: no LAPACK call), and
    ``refine`` steps of iterative refinement against ``M`` remove the regularisation's bias.
    At a non-degenerate vertex / QP optimum ``M`` is non-singular and refinement converges to
    its solution; a singular ``M`` (a face of optima on the free set) gets some point of the
    face, which the caller must check.  Returns ``(x, nu)`` with stationarity
    :math:`UU^\top x + g + E\nu = 0`.
    """
    K, r = E.shape
    dtype = E.dtype
    U = U * valid[:, None]
    E = E * valid[:, None]
    H = U @ U.T + jnp.diag(1.0 - valid)
    top = jnp.concatenate([H, E], axis=1)
    bot = jnp.concatenate([E.T, jnp.zeros((r, r), dtype)], axis=1)
    M = jnp.concatenate([top, bot], axis=0)
    tiny = jnp.finfo(dtype).tiny
    d = jnp.ones((K + r,), dtype)
    for _ in range(2):
        row = jnp.max(jnp.abs(d[:, None] * M * d[None, :]), axis=1)
        d = d / jnp.sqrt(jnp.where(row > tiny, row, 1.0))
    Ms = d[:, None] * M * d[None, :]
    reg = jnp.concatenate([jnp.full((K,), delta, dtype), jnp.full((r,), -delta, dtype)])
    LU, perm = _lu_factor(Ms + jnp.diag(reg))

    def solve(b):
        return d * _lu_solve(LU, perm, d * b)

    rhs = jnp.concatenate([-g * valid, e])
    sol = solve(rhs)
    for _ in range(refine):
        sol = sol + solve(rhs - M @ sol)
    return sol[:K], sol[K:]
