"""jaxens: differentiable, jit-compiled ensembling of language models at decoding time.

Flat re-exports of the public API (optax style): combiners, the bottleneck problem and its
solvers, samplers, the decode loop and ME.  Models and checkpoints live in
:mod:`jaxens.models` (``jaxens.zoo`` is :mod:`jaxens.models.zoo`).
"""

from jaxens import objectives
from jaxens.bat import bat_accept, bat_logits, bat_token_mask
from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.base import Combiner
from jaxens.combiners.bottleneck import BottleneckState, bottleneck, default_solver
from jaxens.evaluate import EvalConfig, EvalResult  # `jaxens eval` harness (jaxens.evaluate)
from jaxens import learn  # learn combiner parameters (jaxens.learn)
from jaxens.decode import Decoder, DecodeOutput, generate, make_combiner, register_combiner
from jaxens.mixture import MixtureEnsemble, me
from jaxens.models import zoo
from jaxens.objectives import OBJECTIVES
from jaxens.problem import BottleneckProblem, make_problem
from jaxens.sampling import Sampler, greedy
from jaxens.solvers.admm import ADMM
from jaxens.solvers.least_squares import least_squares
from jaxens.solvers.fista import FISTA
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.solution import Solution, Status, raise_if_failed
from jaxens import sharding  # device meshes (jaxens.sharding)
from jaxens.sharding import ShardedDecoder, ShardingConfig
from jaxens.vocab import CrossDecoder, align, cross_generate  # cross-tokenizer ensembles
from jaxens.train import TrainConfig, train_member

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "CrossDecoder",
    "BottleneckProblem",
    "BottleneckState",
    "Combiner",
    "DecodeOutput",
    "Decoder",
    "EntropicNewton",
    "EvalConfig",
    "EvalResult",
    "FISTA",
    "MixtureEnsemble",
    "OBJECTIVES",
    "CrossEntropyNewton",
    "Sampler",
    "ShardedDecoder",
    "ShardingConfig",
    "Solution",
    "Status",
    "TrainConfig",
    "bat_accept",
    "bat_logits",
    "bat_token_mask",
    "align",
    "bottleneck",
    "cross_generate",
    "default_solver",
    "generate",
    "greedy",
    "learn",
    "least_squares",
    "logit_average",
    "make_combiner",
    "make_problem",
    "me",
    "objectives",
    "prob_average",
    "raise_if_failed",
    "register_combiner",
    "sharding",
    "train_member",
    "zoo",
]
