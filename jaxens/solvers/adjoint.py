r"""How a solver's returned ``p`` is differentiated: adjoint objects (optimistix's ``adjoint=``).

Every solver runs its loop on stopped inputs (no tangents inside the iteration) and attaches
the derivative afterwards, chosen by its ``adjoint`` field:

* :class:`ImplicitAdjoint` (default): the implicit function theorem on the optimality
  conditions :math:`F(x^\star(\pi), \pi) = 0` of the returned point,
  :math:`\partial x^\star/\partial\pi = -(\partial_x F)^{-1}\partial_\pi F`; reverse mode needs
  one linear solve with :math:`(\partial_x F)^\top` and one VJP of :math:`F`, no stored
  iterate.  The Newton solvers use the dual gradient :math:`F = \nabla\varphi`
  (:mod:`jaxens.solvers.implicit`); FISTA and ADMM the KKT conditions on the returned support
  (:mod:`jaxens.solvers.support_adjoint`); the min-underestimation LP its basic solution.
* :class:`UnrolledAdjoint`: reverse mode through ``steps`` further iterations of the solver's
  map :math:`x_{k+1} = T(x_k, \pi)` started from the converged (stopped) point:
  :math:`\bar\pi = \sum_k (\partial_\pi T)^\top \bar x_{k+1}` with the derivative iterates
  :math:`\bar x_k = (\partial_x T)^\top\bar x_{k+1}`, which converge at the solver's linear
  rate (so ``steps`` must be of the order of the forward iteration count).  The forward value
  is the converged ``p`` either way (``stop_gradient(p) + T^k(p) - stop_gradient(T^k(p))``).
  For ``EntropicNewton`` the forward pass itself runs ``steps`` Newton steps.

Both are frozen dataclasses (hashable: solvers are static arguments of ``jax.jit``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint"]


class AbstractAdjoint:
    """Base class of the adjoint choices (no behaviour: solvers dispatch on the type)."""


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(AbstractAdjoint):
    """Implicit differentiation of the optimality conditions at the returned point."""


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(AbstractAdjoint):
    """Reverse mode through ``steps`` solver iterations from the converged point.

    Attributes:
      steps: the number of unrolled iterations; ``None``: the solver's default (``FISTA``:
        500, ``ADMM``: 2000, ``EntropicNewton``: its ``max_iters``).
    """

    steps: int | None = None

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Expected steps >= 1, got {self.steps}")

    def num_steps(self, default: int) -> int:
        """``steps``, or ``default`` when ``None``."""
        return default if self.steps is None else self.steps


def check_adjoint(adjoint: object) -> AbstractAdjoint:
    """``adjoint`` if it is an :class:`AbstractAdjoint`, else a ``TypeError`` naming the choices."""
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"adjoint must be ImplicitAdjoint() or UnrolledAdjoint(steps=...) "
            f"(jaxens.solvers.adjoint), got {adjoint!r}"
        )
    return adjoint
