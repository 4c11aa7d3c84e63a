"""jaxens: differentiable, jit-compiled ensembling of language models at decoding time."""

from jaxens.problem import BottleneckProblem, make_problem
from jaxens.solvers.solution import Solution, Status, raise_if_failed

__version__ = "0.1.0"

from jaxens.combiners.base import Combiner
from jaxens.combiners.averaging import logit_average, prob_average
