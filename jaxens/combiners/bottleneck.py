r"""The softmax-bottleneck combiner: solve for the distribution every member agrees with.

For each batch row, given the members' logits :math:`\ell_i` (each ``(B, v)``):

1. member distributions :math:`\hat p_i = \mathrm{softmax}(\ell_i)` and moments
   :math:`m_i = A_i^\top \hat p_i` (:meth:`BottleneckProblem.moments`);
2. if there are hard members, the least-squares phase
   :math:`\min_{p\in\Delta}\lVert A_H^\top p - m_H\rVert^2` decides feasibility; an infeasible row
   returns that least-squares distribution with status ``INFEASIBLE`` and a Farkas certificate
   (never a silent fallback);
3. otherwise the objective builds its typed instance (:func:`jaxens.objectives.instance`) and
   the solver returns :math:`p^\star` through the one interface
   ``solver.solve(problem, instance, warm)`` (default: :func:`jaxens.solvers.defaults.default_solver`);
4. optional smoothing :math:`(1-\lambda)p^\star + \lambda\,\mathrm{softmax}(\sum_i w_i\ell_i)` keeps
   every token the logit average allows (LP vertices put zero mass on most tokens).

The output is :math:`\log p` (``-inf`` where :math:`p_j = 0`) and the per-row
:class:`~jaxens.solvers.solution.Solution`.  Rows with NaN/``+inf`` logits return the uniform
distribution over the allowed tokens with status ``NONFINITE_INPUT``.

Gradients with respect to the member logits, the weights, ``rho`` and ``lam`` flow through the
solvers' implicit (or unrolled) adjoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

import jaxens.objectives as obj
from jaxens.combiners.base import Combiner, check_member_logits, check_weights
from jaxens.problem import BottleneckProblem
from jaxens.solvers.defaults import default_solver
from jaxens.solvers.least_squares import default_feas_rtol, least_squares
from jaxens.solvers.projections import uniform_on
from jaxens.solvers.solution import Solution, Status


class BottleneckState(NamedTuple):
    """Warm starts carried between decoding steps (one per row), and the problem's arrays.

    The problem rides in the state so that a compiled decode loop receives ``A``/``Q`` as
    arguments: closing over them would bake ``v x D`` constants into the executable (slow
    constant folding, one executable per ensemble).
    """

    warm: Any  # solver-specific warm start pytree with a leading batch axis
    valid: Bool[Array, " B"]  # False before the first step
    problem: BottleneckProblem


def _select(pred: Array, a: Solution, b: Solution) -> Solution:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def solve_row(
    problem: BottleneckProblem,
    objective: str,
    solver: Any,
    logits: Float[Array, "n v"],
    weights: Float[Array, " n"],
    rho: Float[Array, " n"],
    warm: Any,
    check_feasibility: bool = True,
) -> tuple[Solution, Any]:
    """Solve one row.  Returns the solution and the next warm start."""
    sol, new_warm, m, d = _objective_row(problem, objective, solver, logits, weights, rho, warm)
    if _needs_check(problem, objective, check_feasibility):
        sol = _feasibility_fix(problem, sol, m, d.mask, _witnessed(problem, sol, m))
    return _nonfinite_fallback(sol, d), new_warm


def _needs_check(problem: BottleneckProblem, objective: str, check_feasibility: bool) -> bool:
    return bool(problem.hard) and check_feasibility and objective != "least_squares"


def _objective_row(problem, objective, solver, logits, weights, rho, warm):
    """The objective's solve for one row: ``(solution, next warm start, moments, row data)``."""
    d = obj.row_data(objective, logits, weights)
    probs = jnp.exp(d.logp)
    m = problem.moments(probs, problem.constrained)
    sol, new_warm = solver.solve(problem, obj.instance(objective, d, m, rho), warm)
    return sol, new_warm, m, d


def _solve_feasibility_first(problem, objective, solver, x, w, r, warm, warm_axis):
    """Batched solve with the least-squares phase first (several hard members).

    Rows the phase certifies ``INFEASIBLE`` return its least-squares distribution and
    certificate; the objective runs (one batch-level ``lax.cond``) only when some row is not
    certified, and its answer is kept on those rows.
    """

    def inputs(xx):
        d = obj.row_data(objective, xx, w)
        return d, problem.moments(jnp.exp(d.logp), problem.constrained)

    d, m = jax.vmap(inputs)(x)
    # rows one after another: the minimum-norm point's loop lengths differ per row (under vmap
    # every row would run as long as the slowest at every level)
    ls = jax.lax.map(lambda a: least_squares(problem, a[0], a[1]), (jax.lax.stop_gradient(m), d.mask))
    infeasible = ls.status == Status.INFEASIBLE

    def objective_rows(_):
        def one(dd, mm, wm):
            return solver.solve(problem, obj.instance(objective, dd, mm, r), wm)

        return jax.vmap(one, in_axes=(0, 0, warm_axis))(d, m, warm)

    out_shape = jax.eval_shape(objective_rows, None)

    def skip(_):
        sol = jax.tree.map(lambda a, s_: a.astype(s_.dtype), ls, out_shape[0])
        return sol, jax.tree.map(lambda s_: jnp.zeros(s_.shape, s_.dtype), out_shape[1])

    sol, new_warm = jax.lax.cond(jnp.all(infeasible | d.nonfinite), skip, objective_rows, None)
    sol = jax.vmap(_select)(infeasible, jax.tree.map(lambda a, s_: a.astype(s_.dtype), ls, sol), sol)
    return jax.vmap(_nonfinite_fallback)(sol, d), new_warm


def _witnessed(problem: BottleneckProblem, sol: Solution, m) -> Array:
    """The row's own solution proves the hard constraints feasible (to tolerance)."""
    p_ng = jax.lax.stop_gradient(sol.p)
    m_ng = jax.lax.stop_gradient(m)
    m_h = problem.hard_moments(m_ng)
    feas_tol = default_feas_rtol(m_ng.dtype) * jnp.maximum(1.0, jnp.linalg.norm(m_h))
    # ... or feasible to the solver's own tolerance, which every solver states in the
    # orthonormal basis (Q^T p = beta, ||beta|| <= 1): A_H^T p - m_H = T^T (Q^T p - beta)
    # is larger by ||T|| ~ ||A_H||, which a tolerance relative to ||m_H|| does not follow.
    # The basis sees only the part of m_H in range(T^T): beta = pinv(T^T) [m_H; 1] drops the
    # rest, so with duplicated / rank-deficient members (two copies of W asked for different
    # moments) Q^T p = beta can hold while A_H^T p = m_H cannot.  The basis witness therefore
    # also needs m_H consistent: A_H^T (Q beta) = m_H to ``feas_tol`` (a property of the data,
    # computed without a solver's error; members that round differently, e.g. bfloat16 logits
    # of members that agree, are inconsistent and go through the least-squares phase).
    # When [A_H, 1] has full column rank (rank = D_H + 1: no duplicated or rank-deficient hard
    # member) T^T is square and invertible, every m_H is consistent, and the check (two more
    # v-length passes per row and step) is skipped: a static decision on the problem's shapes.
    beta = problem.beta(m_ng)
    q_res = jnp.max(jnp.abs(p_ng @ problem.Q - beta))
    basis_tol = default_feas_rtol(m_ng.dtype)
    in_basis = q_res <= basis_tol
    if problem.rank < m_h.shape[-1] + 1:
        incons = jnp.max(jnp.abs(problem.hard_products(problem.Q @ beta) - m_h))
        in_basis = in_basis & (incons <= feas_tol)
    return (sol.status == Status.SOLVED) & ((sol.primal_residual <= feas_tol) | in_basis)


def _feasibility_fix(problem: BottleneckProblem, sol: Solution, m, mask, witnessed) -> Solution:
    """The least-squares phase: an infeasible row gets the least-squares distribution and its
    certificate (status ``INFEASIBLE``).

    The feasibility verdict is piecewise constant; the least-squares fallback is returned
    without a gradient (use the least_squares objective itself to differentiate it).  A
    witnessed row (see :func:`_witnessed`) starts the phase at its own ``p`` with moments it
    satisfies exactly and stops at iteration 0; other rows run to the least-squares optimum
    and its certificate.  (Under vmap the loop runs as long as the slowest row, so rows that
    need no check must not iterate; the combiner skips the phase altogether, with a
    batch-level ``lax.cond``, when every row is witnessed.)
    """
    p_ng = jax.lax.stop_gradient(sol.p)
    m_ng = jax.lax.stop_gradient(m)
    own = problem.moments(jnp.broadcast_to(p_ng, (problem.num_members,) + p_ng.shape), problem.constrained)
    m_ls = jnp.where(witnessed, own, m_ng)
    ls = least_squares(problem, m_ls, mask, p0=p_ng)
    ls = ls._replace(status=jnp.where(witnessed, Status.SOLVED, ls.status).astype(ls.status.dtype))
    return _select(ls.status == Status.INFEASIBLE, ls, sol)


def _nonfinite_fallback(sol: Solution, d) -> Solution:
    fallback = sol._replace(
        p=uniform_on(d.mask, sol.p.dtype),
        status=jnp.asarray(Status.NONFINITE_INPUT, sol.status.dtype),
    )
    return _select(d.nonfinite, fallback, sol)


@dataclasses.dataclass(frozen=True)
class _Config:
    objective: str
    solver: Any
    check_feasibility: bool


def bottleneck(
    problem: BottleneckProblem,
    objective: str = "kl",
    *,
    weights: Float[Array, " n"] | None = None,
    rho: Float[Array, " n"] | float | None = None,
    lam: float | Float[Array, ""] = 0.0,
    solver: Any | None = None,
    check_feasibility: bool = True,
    warm_start: bool = True,
) -> Combiner:
    r"""The bottleneck combiner for a prebuilt :class:`BottleneckProblem`.

    Per row: :math:`\min_{p\in\Delta_v} f(p)` s.t. :math:`A_H^\top p = A_H^\top \hat p`
    (the hard members' moments), plus :math:`\tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2`
    for the soft ones, with ``f`` the objective (e.g. ``kl``:
    :math:`\sum_i w_i\,\mathrm{KL}(p\,\|\,\hat p_i)`).  Example::

        comb = bottleneck(make_problem([W1, W2], hard="all"), "kl")
        log_p, state, sol = comb.combine([l1, l2], comb.init(B))   # sol.status per row

    Args:
      problem: from :func:`jaxens.make_problem` (its ``hard``/``soft`` sets are the constraint set).
      objective: one of :data:`jaxens.objectives.OBJECTIVES`.
      weights: member weights ``w_i`` (normalised; default uniform).
      rho: soft-constraint strengths ``rho_i`` (scalar or per member; used for ``problem.soft``).
      lam: smoothing weight towards the logit average, in ``[0, 1]``.
      solver: a solver overriding :func:`~jaxens.solvers.defaults.default_solver` (it must accept
        the objective's instance type, :mod:`jaxens.solvers.instances`).
      check_feasibility: run the least-squares phase on hard constraints (reports infeasibility).
      warm_start: carry each row's warm start (the solver's ``cold_start`` value, then each
        solve's ``next_warm``) to the next step.
    """
    obj.check_objective(objective)
    n = problem.num_members
    solver = default_solver(objective) if solver is None else solver
    if isinstance(lam, (int, float)) and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (smoothing weight) must be in [0, 1], got {lam}")
    check_weights(weights, n, owner="bottleneck")  # negative, zero, NaN or too few/many: an error now
    _check_rho(rho, n)
    if problem.soft and rho is None:
        raise ValueError(
            f"problem has soft members {problem.soft}; pass rho (a scalar or one value per member)"
        )

    def _rho(dtype):
        if rho is None:
            return jnp.zeros((n,), dtype)
        r = jnp.broadcast_to(jnp.asarray(rho, dtype), (n,)) if jnp.ndim(rho) == 0 else jnp.asarray(rho, dtype)
        if r.shape != (n,):
            raise ValueError(f"rho must be a scalar or have shape ({n},), got {r.shape}")
        return r

    check = _needs_check(problem, objective, check_feasibility)
    # two or more hard members: their moments may admit no distribution (no member is a witness
    # of the others'); decide feasibility first, and skip the objective where every row is
    # certified infeasible (an objective solver on an empty set runs to its cap).
    precheck = check and len(problem.hard) >= 2

    def row(prob, x, w, r, warm):
        """One row's objective solve (the least-squares phase follows, batched, in ``solve``)."""
        sol, new_warm, m, d = _objective_row(prob, objective, solver, x, w, r, warm)
        return sol, new_warm, m, d

    def solve(prob, x, w, r, warm, warm_axis):
        if precheck:
            return _solve_feasibility_first(prob, objective, solver, x, w, r, warm, warm_axis)
        sol, new_warm, m, d = jax.vmap(row, in_axes=(None, 0, None, None, warm_axis))(prob, x, w, r, warm)
        if check:
            witnessed = jax.vmap(_witnessed, in_axes=(None, 0, 0))(prob, sol, m)
            fix = jax.vmap(_feasibility_fix, in_axes=(None, 0, 0, 0, 0))
            sol = jax.lax.cond(
                jnp.all(witnessed | d.nonfinite), lambda s: s, lambda s: fix(prob, s, m, d.mask, witnessed), sol
            )
        return jax.vmap(_nonfinite_fallback)(sol, d), new_warm

    def _warm_shape(batch: int, dtype):
        if _cold_warm(problem, objective, solver, dtype) is None or not warm_start:
            return ()
        x = jax.ShapeDtypeStruct((n, problem.vocab_size), dtype)
        w = jax.ShapeDtypeStruct((n,), dtype)
        cold = _cold_warm(problem, objective, solver, dtype)
        out = jax.eval_shape(lambda x, w, r: solve_row(problem, objective, solver, x, w, r, cold, False)[1], x, w, w)
        return jax.tree.map(lambda s: jnp.zeros((batch,) + s.shape, s.dtype), out)

    def init(batch_size: int) -> BottleneckState:
        dtype = problem.A.dtype
        return BottleneckState(_warm_shape(batch_size, dtype), jnp.zeros((batch_size,), bool), problem)

    def combine(logits, state: BottleneckState | None):
        B, v = check_member_logits(logits, n)
        if v != problem.vocab_size:
            raise ValueError(
                f"member logits have vocabulary size {v} but the bottleneck problem was built for "
                f"v={problem.vocab_size} (unembedding shape {tuple(problem.A.shape)})"
            )
        dtype = problem.A.dtype
        x = jnp.stack([jnp.asarray(l, dtype) for l in logits], axis=1)  # (B, n, v)
        w = jnp.asarray(check_weights(weights, n, dtype, owner="bottleneck"), dtype)
        r = _rho(dtype)
        if state is None:
            state = init(B)
        prob = state.problem
        cold = _cold_warm(problem, objective, solver, dtype)
        if cold is None or not warm_start:
            sol, _ = solve(prob, x, w, r, cold, None)
            new_warm = ()
        else:
            warm = jax.tree.map(
                lambda prev, c: jnp.where(state.valid.reshape((B,) + (1,) * (prev.ndim - 1)), prev, c),
                state.warm,
                cold,
            )
            sol, new_warm = solve(prob, x, w, r, warm, 0)
        p = sol.p
        if not (isinstance(lam, (int, float)) and lam == 0.0):
            d = jax.vmap(lambda xx: obj.row_data("kl", xx, w))(x)
            q = jax.nn.softmax(jax.vmap(obj.kl_prior)(d), axis=-1)
            p = (1.0 - lam) * p + lam * q
        logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
        return logp, BottleneckState(new_warm, jnp.ones((B,), bool), prob), sol

    return Combiner(init, combine)


def _check_rho(rho: Any, n: int) -> None:
    """``rho`` (soft-constraint strengths) must be finite and ``>= 0`` (concrete values; traced
    ones are the caller's)."""
    if rho is None or isinstance(rho, jax.core.Tracer):
        return
    r = jnp.ravel(jnp.asarray(rho, jnp.float32))
    if r.size not in (1, n):
        raise ValueError(f"rho must be a scalar or have shape ({n},), got {jnp.shape(rho)}")
    if not bool(jnp.all(jnp.isfinite(r) & (r >= 0))):
        raise ValueError(f"rho (soft-constraint strength) must be finite and >= 0, got {r.tolist()}; "
                         "a negative rho rewards violating the constraint (use 0 to switch a member off)")


def _cold_warm(problem: BottleneckProblem, objective: str, solver: Any, dtype) -> Any:
    """The cold-start warm pytree (unbatched), as each solver defines it (``None``: no carry)."""
    return solver.cold_start(problem, dtype)
