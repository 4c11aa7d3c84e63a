r"""The solver protocol and the one driver that owns the loop, the cap and the status.

A solver (a frozen dataclass of static hyperparameters; the iterate lives in a state pytree, as
in optimistix's ``AbstractIterativeSolver``) is called through one interface,

.. code-block:: python

    solution, next_warm = solver.solve(problem, instance, warm)

with ``instance`` one of the typed rows of :mod:`jaxens.solvers.instances` (each solver lists
the types it ``accepts``) and ``warm`` the previous call's ``next_warm`` or ``None`` (a cold
start; :meth:`AbstractSolver.cold_start` is the unbatched cold value a decode loop carries).

Iterative solvers also implement ``init`` / ``step`` / ``terminate`` / ``status`` on the row's
precomputed data (``row``: whatever the solver closes over, never carried by the loop), and
:func:`iterate` runs

.. math::  x_0 = \mathrm{init},\qquad x_{k+1} = \mathrm{step}(x_k)
           \quad\text{while}\quad k < \texttt{max\_iters} \wedge \neg\,\mathrm{terminate}(x_k)

in one ``lax.while_loop`` and returns the final state, its iteration count and its
:class:`~jaxens.solvers.solution.Status` (``NUMERICAL_ERROR`` if a non-finite value stopped it,
``SOLVED`` if it met the tolerance, ``MAX_ITERS`` at the cap; a solver may refine it).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from jaxens.problem import BottleneckProblem
from jaxens.solvers.instances import ACCEPTED_BY
from jaxens.solvers.solution import Solution, Status

__all__ = ["AbstractSolver", "AbstractIterativeSolver", "iterate"]


class AbstractSolver(abc.ABC):
    """``solve(problem, instance, warm) -> (Solution, next_warm)`` for the instance types in
    ``accepts``."""

    accepts: ClassVar[tuple[type, ...]] = ()

    @abc.abstractmethod
    def solve(self, problem: BottleneckProblem, instance: Any, warm: Any = None) -> tuple[Solution, Any]:
        """Solve one row (``jax.vmap`` over a batch of instances and warm starts)."""

    def cold_start(self, problem: BottleneckProblem, dtype=None) -> Any:
        """The unbatched warm value a decode loop starts from; ``None``: nothing is carried."""
        return None

    def check_instance(self, instance: Any) -> None:
        """``TypeError`` naming the instance and the solvers that accept it, unless accepted."""
        if not isinstance(instance, self.accepts):
            kind = type(instance).__name__
            takers = ACCEPTED_BY.get(type(instance))
            hint = (
                f"{kind} is accepted by {', '.join(takers)}"
                if takers
                else "pass an instance from jaxens.solvers.instances"
            )
            raise TypeError(
                f"{type(self).__name__} does not accept {kind} (it accepts "
                f"{', '.join(t.__name__ for t in self.accepts)}); {hint}"
            )


class AbstractIterativeSolver(AbstractSolver):
    """A solver whose loop :func:`iterate` runs: ``step`` / ``terminate`` (and ``status``) on the
    row's data ``row`` and a state pytree with an ``iterations`` count."""

    @abc.abstractmethod
    def step(self, row: Any, state: Any) -> Any:
        """One iteration: the next state."""

    @abc.abstractmethod
    def terminate(self, row: Any, state: Any) -> Bool[Array, ""]:
        """Stop before the cap (tolerance met, an extra stop rule, or a non-finite value)."""

    def failed(self, row: Any, state: Any) -> Bool[Array, ""]:
        """A non-finite value stopped the loop (status ``NUMERICAL_ERROR``)."""
        return jnp.zeros((), bool)

    def converged(self, row: Any, state: Any) -> Bool[Array, ""]:
        """The tolerance was met (status ``SOLVED``); default: terminated and not failed."""
        return self.terminate(row, state) & ~self.failed(row, state)

    def iterations(self, state: Any) -> Int[Array, ""]:
        return state.iterations

    def status(self, row: Any, state: Any) -> Int[Array, ""]:
        """``NUMERICAL_ERROR`` if failed, ``SOLVED`` if converged, else ``MAX_ITERS``."""
        return jnp.where(
            self.failed(row, state),
            Status.NUMERICAL_ERROR,
            jnp.where(self.converged(row, state), Status.SOLVED, Status.MAX_ITERS),
        ).astype(jnp.int32)


def iterate(
    solver: AbstractIterativeSolver, row: Any, state: Any, max_iters: int
) -> tuple[Any, Int[Array, ""], Int[Array, ""]]:
    """Run ``solver.step`` from ``state`` until ``solver.terminate`` or ``max_iters`` iterations
    (counted by ``solver.iterations``).  Returns ``(state, iterations, status)``."""

    def cond(s):
        return (solver.iterations(s) < max_iters) & ~solver.terminate(row, s)

    state = jax.lax.while_loop(cond, lambda s: solver.step(row, s), state)
    return state, solver.iterations(state), solver.status(row, state)
