r"""Running jaxens on a device mesh with JAX's own sharding (``jax.sharding``; GSPMD).

Three mesh axes, each optional, named by a :class:`ShardingConfig`:

* ``batch``: data parallelism.  Prompts / member logits ``(B, v)`` are split over rows; every
  row's decoding state (KV caches, token buffer, solver warm starts) lives on the devices of
  its rows.  ``B`` must be a multiple of the axis size.
* ``vocab``: the bottleneck problem's ``v x D`` matrices (``A``, ``Q``) and every ``(B, v)``
  vector are split over tokens.  Each solver iteration's matrix products
  :math:`A^\top p = \sum_{\text{shards } s} A_s^\top p_s` become a local product plus an
  all-reduce of a length-``D`` vector, and :math:`A z` stays local, so ``v x D`` never has to
  fit on one device: per device it is ``(v / |vocab|) x D``.  Reductions over ``v``
  (``logsumexp``, norms, ``max``) are all-reduces of scalars.  A ``v`` that is not a multiple of
  the axis size is padded: the pad rows of ``A``/``Q`` are zero and the pad tokens get
  ``-inf`` logits, so every objective gives them probability 0 and the real tokens the same
  distribution as the unpadded problem (:func:`pad_problem`).
* ``model``: tensor parallelism for members too large for one device: member parameters are
  placed with a :class:`~jax.sharding.NamedSharding` per array (:func:`shard_params`), and
  GSPMD propagates the sharding through the forward pass.

Nothing here changes the arithmetic: a sharded run computes the single-device result up to the
order of floating-point reductions (tested to 1e-5 in float32 on 1..8 devices,
``tests/decode/test_sharding.py``).  Entry points:

* :mod:`~jaxens.sharding.config`: :func:`make_mesh` / :class:`ShardingConfig` - the mesh and
  which axis does what (validated);
* :mod:`~jaxens.sharding.problem`: :func:`shard_problem`, :func:`shard_logits` - place a problem
  / member logits on the mesh; :func:`sharded_bottleneck` - the bottleneck combiner on a mesh
  (pads ``v`` when needed);
* :mod:`~jaxens.sharding.params`: :func:`shard_params` - member parameters, replicated or
  tensor parallel;
* :mod:`~jaxens.sharding.decoder`: :class:`ShardedDecoder` - :class:`jaxens.Decoder` with
  mesh placement hooks (:func:`mesh_hooks`): batch-sharded state and replicated or
  model-sharded members.

Several hosts: call :func:`jax.distributed.initialize` first; ``jax.devices()`` is then the
global device list and the same code runs on every process (``docs/sharding.md``).
"""

from jaxens.sharding.config import AXIS_ROLES, ShardingConfig, make_mesh
from jaxens.sharding.decoder import ShardedDecoder, constrain_decode_state, constrain_logits, mesh_hooks
from jaxens.sharding.params import ParamRule, make_tensor_parallel_rule, replicate_rule, shard_params
from jaxens.sharding.problem import (
    pad_logits,
    pad_problem,
    problem_shardings,
    process_local_logits,
    shard_logits,
    shard_problem,
    sharded_bottleneck,
)

__all__ = [
    "AXIS_ROLES",
    "ParamRule",
    "ShardingConfig",
    "ShardedDecoder",
    "constrain_decode_state",
    "constrain_logits",
    "make_mesh",
    "make_tensor_parallel_rule",
    "mesh_hooks",
    "pad_logits",
    "pad_problem",
    "problem_shardings",
    "process_local_logits",
    "replicate_rule",
    "shard_logits",
    "shard_params",
    "shard_problem",
    "sharded_bottleneck",
]
