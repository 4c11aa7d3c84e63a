r"""Basis-aware truncation (BAT) sampling, batched over candidate tokens.

Finlayson, Hewitt, Koller, Swayamdipta & Sabharwal, "Closing the Curious Case of Neural Text
Degeneration", ICLR 2024 (https://arxiv.org/abs/2310.01693).  A model with unembedding
:math:`W \in \mathbb R^{v\times d}` can only output distributions :math:`\hat p` whose errors are
constrained by the softmax bottleneck; if the true distribution ``p`` is such that
:math:`W^\top p = W^\top\hat p` and ``p`` is close to :math:`\hat p` from above
(:math:`p \le \hat p/(1-\delta)`), a token ``j`` certainly has non-zero true probability when
**no** such ``p`` can put :math:`p_j = 0`:

.. math::

    \text{accept } j \iff \hat p_j \ge \text{threshold}\ \ \text{or}\ \
    \{p \in \Delta_v : A_H^\top p = A_H^\top\hat p,\ p_j = 0,\ p \le \hat p/(1-\delta)\} = \varnothing .

(``A_H`` are the problem's hard columns, e.g. ``make_problem([W], hard="all")``; with a bias the
bias column is part of ``A_H``.)  The authors solved one LP per candidate with CVXPY + MOSEK on
the CPU.  Here each candidate's emptiness is decided by the least-squares phase
(:func:`jaxens.solvers.least_squares.least_squares` with ``p_j`` pinned to 0 and the caps, in
``decide`` mode): a positive Farkas margin proves the set empty; all ``K`` candidates run in one
``vmap``.  A candidate whose verdict stays undecided at the iteration cap is **not** accepted
(only certified tokens are added), so acceptance is sound up to the tolerance.  Note
that the set is trivially empty when :math:`\hat p_j > \delta` (the caps then sum to less than one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxens.combiners.base import unusable_members
from jaxens.problem import BottleneckProblem
from jaxens.solvers.least_squares import least_squares
from jaxens.solvers.fista import FISTA
from jaxens.solvers.solution import Solution, Status

DEFAULT_BAT_SOLVER = FISTA(tol=1e-7, max_iters=3000)


def bat_solve(
    problem: BottleneckProblem,
    p_hat: Float[Array, " v"],
    m: Float[Array, " D"],
    candidates: Int[Array, " K"],
    delta: float = 0.5,
    solver: FISTA = DEFAULT_BAT_SOLVER,
    feas_rtol: float | None = None,
) -> Solution:
    """The ``K`` least-squares feasibility solves (one per candidate; batched ``Solution``)."""
    return _bat_solve(problem, p_hat, m, candidates, delta, solver, feas_rtol)


@functools.partial(jax.jit, static_argnames=("solver", "feas_rtol"))
def _bat_solve(problem, p_hat, m, candidates, delta, solver, feas_rtol):
    v = problem.vocab_size
    dtype = problem.A.dtype
    p_hat = jnp.asarray(p_hat, dtype)
    if p_hat.shape != (v,):
        raise ValueError(f"p_hat must have shape (v={v},) for one row (vmap for a batch), got {p_hat.shape}")
    candidates = jnp.asarray(candidates)
    if candidates.ndim != 1 or not jnp.issubdtype(candidates.dtype, jnp.integer):
        raise ValueError(f"candidates must be an int[K] vector of token ids, got {candidates.dtype}{candidates.shape}")
    ub = p_hat / (1.0 - jnp.asarray(delta, dtype))
    # warm start: p_hat with the candidate's mass spread proportionally over the rest
    def one(j):
        mask = jnp.ones((v,), bool).at[j].set(False)
        p0 = jnp.where(mask, p_hat, 0.0)
        return least_squares(
            problem, m, mask, solver, ub=ub, feas_rtol=feas_rtol, decide=True, p0=p0
        )

    return jax.vmap(one)(candidates)


def bat_accept(
    problem: BottleneckProblem,
    p_hat: Float[Array, " v"],
    m: Float[Array, " D"],
    candidates: Int[Array, " K"],
    delta: float = 0.5,
    threshold: float = 0.05,
    solver: FISTA = DEFAULT_BAT_SOLVER,
    feas_rtol: float | None = None,
) -> Bool[Array, " K"]:
    r"""Which candidate tokens BAT keeps for sampling (one row; ``vmap`` for a batch).

    Args:
      problem: bottleneck data of the model (its hard columns are the model's ``[W, b]``).
      p_hat: the model's next-token distribution, ``(v,)``.
      m: moments of this row, ``problem.moments(p_hat[None])`` (``(D,)``).
      candidates: ``int[K]`` token ids to test (e.g. the top-K tokens).
      delta: the slack in :math:`p \le \hat p / (1-\delta)`, in ``(0, 1)``.  The defaults of
        ``delta`` and ``threshold`` are jaxens' choices, not the paper's; tune them.
      threshold: tokens with :math:`\hat p_j \ge` threshold are accepted without a solve.
      solver, feas_rtol: the least-squares solver and relative feasibility tolerance.

    Returns:
      ``bool[K]``: accepted candidates.
    """
    sol = bat_solve(problem, p_hat, m, candidates, delta, solver, feas_rtol)
    p_c = jnp.asarray(p_hat)[jnp.asarray(candidates)]
    return (p_c >= threshold) | (sol.status == Status.INFEASIBLE)


def bat_token_mask(
    problem: BottleneckProblem,
    p_hat: Float[Array, " v"],
    m: Float[Array, " D"],
    candidates: Int[Array, " K"],
    delta: float = 0.5,
    threshold: float = 0.05,
    solver: FISTA = DEFAULT_BAT_SOLVER,
    feas_rtol: float | None = None,
) -> Bool[Array, " v"]:
    """``bool[v]``: tokens BAT keeps.  Non-candidates are dropped; the argmax of ``p_hat`` is
    always kept so the truncated distribution is never empty."""
    acc = bat_accept(problem, p_hat, m, candidates, delta, threshold, solver, feas_rtol)
    v = problem.vocab_size
    keep = jnp.zeros((v,), bool).at[jnp.asarray(candidates)].max(acc)
    return keep.at[jnp.argmax(jnp.nan_to_num(jnp.asarray(p_hat), nan=-1.0))].set(True)


def bat_logits(
    logits: Float[Array, " v"], keep: Bool[Array, " v"]
) -> Float[Array, " v"]:
    """Logits for sampling from the truncated distribution: ``-inf`` where ``keep`` is False.

    Unusable logits (NaN / ``+inf`` anywhere, or ``-inf`` on every token; the solves of
    :func:`bat_solve` then report ``NONFINITE_INPUT``) give the uniform distribution (zeros),
    never NaN and never an empty support."""
    bad = unusable_members([logits[None]])[0, 0]
    return jnp.where(bad, jnp.zeros_like(logits), jnp.where(keep, logits, -jnp.inf))
