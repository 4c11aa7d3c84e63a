"""What every solver returns: the distribution, a status and the residuals.

A solver never hands back a silent NaN. Failures are values (optimistix's ``RESULTS``,
jaxopt's BoxOSQP ``status``): the caller inspects ``Solution.status`` or asks
:func:`raise_if_failed` to raise.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class Status(enum.IntEnum):
    """Outcome of a solve, stored per row as an ``int32``.

    Example::

        _, _, sol = comb.combine(logits, None)
        names = [Status(int(s)).name for s in sol.status]   # e.g. ['SOLVED', 'INFEASIBLE']

    * ``SOLVED`` - converged: primal residual and gap / dual residual within tolerance.
    * ``MAX_ITERS`` - the iteration cap was reached; ``p`` is the best iterate (a valid
      distribution), the residuals say how far it is from optimal.
    * ``INFEASIBLE`` - the hard constraints admit no distribution.  ``p`` is the
      least-squares relaxation ``argmin_{p in simplex} ||A^T p - m||^2`` and ``certificate``
      holds a Farkas direction ``d`` with ``d^T m > max_k (A d)_k``.
    * ``NONFINITE_INPUT`` - the inputs of this row held NaN (or +inf) logits; ``p`` is the
      uniform distribution over the tokens that were not masked, never NaN.
    * ``NUMERICAL_ERROR`` - a non-finite value appeared inside the solver; ``p`` is the last
      finite iterate.
    """

    SOLVED = 0
    MAX_ITERS = 1
    INFEASIBLE = 2
    NONFINITE_INPUT = 3
    NUMERICAL_ERROR = 4


STATUS_MESSAGES = {
    Status.SOLVED: "solved to tolerance",
    Status.MAX_ITERS: "iteration cap reached before tolerance; increase max_iters or loosen tol",
    Status.INFEASIBLE: (
        "the hard constraints admit no distribution (certificate returned); use soft "
        "constraints, a subset of members, or the least_squares objective"
    ),
    Status.NONFINITE_INPUT: "NaN or +inf in the member logits; the row returns a uniform fallback",
    Status.NUMERICAL_ERROR: "a non-finite value appeared in the solver; try float64 or a larger entropy weight",
}


class Solution(NamedTuple):
    """The result of one bottleneck solve (leading batch axes allowed on every field).

    Example::

        sol, warm = jaxens.EntropicNewton().solve(problem, instance, None)
        sol.p, Status(int(sol.status)).name, sol.primal_residual   # ||A^T p - m||_inf

    Attributes:
      p: the combined distribution, non-negative and summing to one.
      status: :class:`Status` code (``int32``).
      primal_residual: ``||A_h^T p - m_h||_inf`` over the hard constraints (0 when none).
      gap: duality gap or first-order optimality measure of the objective (solver
        specific; documented by each solver).
      iterations: number of iterations (or Newton steps) taken.
      certificate: Farkas direction ``d`` (in the columns of the problem's ``A``) that
        certifies infeasibility when ``status == INFEASIBLE``; zeros otherwise.
      certificate_margin: ``d^T m - max_k (A d)_k``; positive certifies infeasibility.
    """

    p: Float[Array, "*B v"]
    status: Int[Array, "*B"]
    primal_residual: Float[Array, "*B"]
    gap: Float[Array, "*B"]
    iterations: Int[Array, "*B"]
    certificate: Float[Array, "*B D"]
    certificate_margin: Float[Array, "*B"]

    @property
    def converged(self) -> Bool[Array, "*B"]:
        return self.status == Status.SOLVED

    @property
    def infeasible(self) -> Bool[Array, "*B"]:
        return self.status == Status.INFEASIBLE


def raise_if_failed(solution: Solution, allow: tuple[Status, ...] = (Status.SOLVED,)) -> Solution:
    """Raise ``RuntimeError`` (outside jit) if any row's status is not in ``allow``."""
    status = jax.device_get(solution.status)
    bad = sorted({int(s) for s in jnp.ravel(jnp.asarray(status)).tolist()} - {int(a) for a in allow})
    if bad:
        msgs = "; ".join(f"{Status(b).name}: {STATUS_MESSAGES[Status(b)]}" for b in bad)
        raise RuntimeError(f"bottleneck solve failed on some rows ({msgs})")
    return solution
