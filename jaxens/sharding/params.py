r"""Placement of member parameters: replicated, or split over the ``model`` axis (tensor parallel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxens.sharding.config import ShardingConfig

# rule(path, array) -> PartitionSpec for one member parameter
ParamRule = Callable[[tuple, Any], P]


def replicate_rule(path: tuple, x: Any) -> P:
    """Every parameter replicated on every device (pure data parallelism)."""
    return P()


def make_tensor_parallel_rule(model_axis: str, model_size: int) -> ParamRule:
    """A name-free tensor-parallel rule: shard the largest non-layer axis divisible by ``model_size``.

    Stacked-layer tensors ``(L, ...)`` keep their layer axis whole; vectors (norm scales, biases)
    stay replicated.  For the transformer members here this splits the query/key/value/MLP
    projections over their head / hidden axis (or ``d_model``) and the embedding and head over
    ``v`` or ``d_model``.  GSPMD inserts the collectives; any placement computes the same result,
    a placement only changes the communication.
    """

    def rule(path: tuple, x: Any) -> P:
        shape = jnp.shape(x)
        if len(shape) < 2 or model_size == 1:
            return P()
        first = 1 if len(shape) >= 3 else 0
        cands = [a for a in range(first, len(shape)) if shape[a] % model_size == 0 and shape[a] >= model_size]
        if not cands:
            return P()
        a = max(cands, key=lambda i: (shape[i], i))
        spec = [None] * len(shape)
        spec[a] = model_axis
        return P(*spec)

    return rule


def shard_params(state: Any, config: ShardingConfig, rule: ParamRule | None = None) -> Any:
    """Place a member's parameters (an ``nnx.State`` or any pytree) on the mesh.

    ``rule(path, array) -> PartitionSpec`` picks each array's placement; the default replicates
    everything unless the config has a ``model_axis``, in which case
    :func:`make_tensor_parallel_rule` splits the weights over it.
    """
    if rule is None:
        rule = (
            make_tensor_parallel_rule(config.model_axis, config.model_size)
            if config.model_axis is not None and config.model_size > 1
            else replicate_rule
        )
    shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(config.mesh, rule(p, x)), state)
    return jax.device_put(state, shardings)
