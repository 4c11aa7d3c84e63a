r"""jaxens: differentiable, jit-compiled ensembling of language models at decoding time.

Members propose next-token distributions :math:`\hat p_i = \mathrm{softmax}(\ell_i)`; a combiner
turns them into one :math:`\log p` per batch row, and the decode loop samples from it.  The
softmax-bottleneck combiner picks, among the :math:`p \in \Delta_v` with
:math:`W_i^\top p = W_i^\top \hat p_i` for the constrained members, the one an objective prefers.

The public API is flat (optax style); the rooms are submodules:

- :mod:`jaxens.combiners` — logit / probability averaging, the bottleneck, ME, BAT;
- :mod:`jaxens.problem`, :mod:`jaxens.objectives`, :mod:`jaxens.solvers` — the bottleneck problem,
  its objectives and their solvers;
- :mod:`jaxens.decode`, :mod:`jaxens.sampling`, :mod:`jaxens.sharding` — the compiled decode loop;
- :mod:`jaxens.models` — Flax NNX members and checkpoint loading;
- :mod:`jaxens.vocab` — ensembles across tokenizers;
- :mod:`jaxens.learn` — combiner parameters learned by gradient;
- :mod:`jaxens.harness` and :mod:`jaxens.cli` — the application (zoo, training, evaluation, CLI),
  which the library never imports.
"""

from jaxens import learn, objectives, sharding
from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.base import Combiner
from jaxens.combiners.bottleneck import bottleneck
from jaxens.combiners.mixture import MixtureEnsemble
from jaxens.decode import DecodeOutput, Decoder, generate, make_combiner, register_combiner
from jaxens.problem import BottleneckProblem, make_problem
from jaxens.sampling import Sampler
from jaxens.sharding import ShardedDecoder, ShardingConfig
from jaxens.solvers import (
    ADMM,
    FISTA,
    CrossEntropyNewton,
    EntropicNewton,
    Solution,
    Status,
    WorkingSet,
    default_solver,
)
from jaxens.vocab import CrossDecoder, cross_generate

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "BottleneckProblem",
    "Combiner",
    "CrossDecoder",
    "CrossEntropyNewton",
    "DecodeOutput",
    "Decoder",
    "EntropicNewton",
    "FISTA",
    "MixtureEnsemble",
    "Sampler",
    "ShardedDecoder",
    "ShardingConfig",
    "Solution",
    "Status",
    "WorkingSet",
    "bottleneck",
    "cross_generate",
    "default_solver",
    "generate",
    "learn",
    "logit_average",
    "make_combiner",
    "make_problem",
    "objectives",
    "prob_average",
    "register_combiner",
    "sharding",
]
