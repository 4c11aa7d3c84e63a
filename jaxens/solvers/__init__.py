"""The bottleneck solvers: one protocol (:mod:`jaxens.solvers.base`), typed instances
(:mod:`jaxens.solvers.instances`), one objective -> solver table (:mod:`jaxens.solvers.defaults`).

Flat re-exports; the submodules import each other directly, never this package.
"""

from jaxens.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint
from jaxens.solvers.admm import ADMM
from jaxens.solvers.base import AbstractIterativeSolver, AbstractSolver, iterate
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.defaults import default_solver
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.fista import FISTA
from jaxens.solvers.instances import (
    EntropicProgram,
    LeastSquaresProgram,
    LinearProgram,
    MixtureCrossEntropy,
    PenalisedProgram,
    QuadraticProgram,
    RatioProgram,
)
from jaxens.solvers.least_squares import LeastSquares, least_squares
from jaxens.solvers.min_norm_point import MinNormPoint
from jaxens.solvers.ratio_ipm import RatioIPM
from jaxens.solvers.solution import Solution, Status, raise_if_failed
from jaxens.solvers.working_set import WorkingSet

__all__ = [
    "WorkingSet",
    "ADMM",
    "RatioIPM",
    "FISTA",
    "EntropicNewton",
    "CrossEntropyNewton",
    "LeastSquares",
    "least_squares",
    "MinNormPoint",
    "default_solver",
    "Solution",
    "Status",
    "raise_if_failed",
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "AbstractSolver",
    "AbstractIterativeSolver",
    "iterate",
    "LinearProgram",
    "QuadraticProgram",
    "EntropicProgram",
    "MixtureCrossEntropy",
    "RatioProgram",
    "LeastSquaresProgram",
    "PenalisedProgram",
]
