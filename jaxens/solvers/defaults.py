r"""The one objective -> default solver table.

===================== ============================== =======================================================
objective             instance                       default solver (settings)
===================== ============================== =======================================================
``sum_ce``            ``LinearProgram``              ``WorkingSet()`` (``ADMM()`` for caps or an unrolled adjoint; ``EntropicNewton()`` for a gradient smooth in ``c``)
``sum_sq_ce``         ``QuadraticProgram``           ``WorkingSet()`` (``ADMM()`` for caps ``ub`` or an unrolled adjoint)
``least_squares``     ``LeastSquaresProgram``        ``LeastSquares()`` (Wolfe's minimum-norm point, gradient on the support; ``fista=FISTA()`` with caps)
``kl``                ``EntropicProgram``            ``EntropicNewton()``
``max_entropy``       ``EntropicProgram``            ``EntropicNewton()``
``min_underestimation`` ``RatioProgram``             ``RatioIPM()`` (interior point + crossover, certified gap; ``ADMM()`` opt-in)
``cross_entropy``     ``MixtureCrossEntropy``        ``CrossEntropyNewton()``
===================== ============================== =======================================================

The defaults of the solvers themselves: ``WorkingSet()``: working set ``2 (r + k)`` tokens
(rounded up to 64), at most 20 rounds, certified relative gap ``5e-5`` and residual ``1e-5``
(float32) / ``1e-9`` (float64); on the non-degenerate Gaussian family 30-50x HiGHS where ADMM
is 0.3-0.6x (``docs/benchmarks/solvers.md``).  ``ADMM()``: ``rho0=0.1, alpha=1.6``, adaptive
:math:`\rho`, tolerances ``1e-6 / 1e-5`` (float32) or ``1e-7 / 1e-6`` (float64), at most 10,000
(float32) / 50,000 (float64) iterations, ``check_every=25``, polish on.  ``FISTA()``:
``tol=1e-6, max_iters=2000``, restart.  ``EntropicNewton()``: ``tol`` 1e-5 (float32) / 1e-10
(float64), ``max_iters=100``, full Hessian (``hessian_topk=None``).  ``CrossEntropyNewton()``:
``tol`` 1e-5 / 1e-10, ``max_iters=100``.  ``RatioIPM()``: certified relative gap ``5e-5``
(float32) / ``1e-9`` (float64), residual ``1e-6`` / ``1e-11``, at most 100 iterations.  All with :class:`~jaxens.solvers.adjoint.ImplicitAdjoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxens.solvers.admm import ADMM
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.fista import FISTA
from jaxens.solvers.least_squares import LeastSquares
from jaxens.solvers.working_set import WorkingSet
from jaxens.solvers.ratio_ipm import RatioIPM

__all__ = ["default_solver", "DEFAULT_SOLVERS"]

DEFAULT_SOLVERS: dict[str, Any] = {
    "sum_ce": WorkingSet(),
    "sum_sq_ce": WorkingSet(),
    "least_squares": LeastSquares(),
    "kl": EntropicNewton(),
    "max_entropy": EntropicNewton(),
    "min_underestimation": RatioIPM(),
    "cross_entropy": CrossEntropyNewton(),
}


def default_solver(objective: str, **overrides: Any):
    """The solver ``objective`` uses unless one is given (the table of the module doc, e.g.
    ``default_solver("kl") == EntropicNewton()``) with ``overrides`` applied.

    Example::

        default_solver("kl", hessian_topk=2048)   # EntropicNewton(hessian_topk=2048)

    Overrides replace the solver's dataclass fields (``dataclasses.replace``), e.g.
    ``default_solver("sum_ce", max_rounds=40)``.

    For ``least_squares`` the overrides go to the inner ``FISTA`` (``tol``, ``max_iters``, ...)
    unless they name a field of :class:`~jaxens.solvers.least_squares.LeastSquares`.
    """
    if objective not in DEFAULT_SOLVERS:
        raise ValueError(f"unknown bottleneck objective {objective!r}; choose one of {', '.join(DEFAULT_SOLVERS)}")
    solver = DEFAULT_SOLVERS[objective]
    if not overrides:
        return solver
    if isinstance(solver, LeastSquares):
        own = {f.name for f in dataclasses.fields(LeastSquares)}
        outer = {k: v for k, v in overrides.items() if k in own}
        inner = {k: v for k, v in overrides.items() if k not in own}
        if inner:
            outer.setdefault("fista", dataclasses.replace(solver.fista or FISTA(), **inner))
        return dataclasses.replace(solver, **outer)
    return dataclasses.replace(solver, **overrides)
