r"""Decode statistics: a combiner's per-step ``info`` reduced over the steps of a decode.

For a leaf :math:`x_t` of the ``info`` pytree at step :math:`t` and the rows active at that step
(:math:`a_{t,b}`; a leaf whose leading axis is not the batch counts when any row is active):

* bool leaves count the active steps where they are True: :math:`\sum_t [x_{t,b} \wedge a_{t,b}]`;
* integer leaves (e.g. :class:`jaxens.solvers.solution.Status` codes) are histogrammed over
  ``0 .. STATUS_BINS - 1`` (values clipped into that range): shape ``x.shape + (STATUS_BINS,)``;
* float leaves keep the maximum over the active steps (NaN counts as ``+inf``; ``-inf`` when no
  step was active).

Example::

    info = jax.eval_shape(...)            # the structure of one step's info
    stats = init_stats(info)
    stats = update_stats(stats, info_t, active)   # inside the loop, every step
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

STATUS_BINS = 8  # integer diagnostics (e.g. solver Status codes) are histogrammed over 0..7


def init_stats(info_struct: Any) -> Any:
    """Zero statistics for an ``info`` pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""

    def init(x):
        if x.dtype == jnp.bool_:
            return jnp.zeros(x.shape, jnp.int32)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape + (STATUS_BINS,), jnp.int32)
        return jnp.full(x.shape, -jnp.inf, x.dtype)

    return jax.tree.map(init, info_struct)


def update_stats(stats: Any, info: Any, active: Bool[Array, " B"]) -> Any:
    """Add one step's ``info`` to ``stats`` for the ``active`` rows (see the module doc)."""
    B = active.shape[0]

    def upd(acc, x):
        x = jnp.asarray(x)
        if x.ndim >= 1 and x.shape[0] == B:
            act = active.reshape((B,) + (1,) * (x.ndim - 1))
        else:
            act = jnp.any(active)
        act = jnp.broadcast_to(act, x.shape)
        if x.dtype == jnp.bool_:
            return acc + (x & act).astype(jnp.int32)
        if jnp.issubdtype(x.dtype, jnp.integer):
            hist = jax.nn.one_hot(jnp.clip(x, 0, STATUS_BINS - 1), STATUS_BINS, dtype=jnp.int32)
            return acc + hist * act.astype(jnp.int32)[..., None]
        x = jnp.where(jnp.isnan(x), jnp.inf, x)
        return jnp.maximum(acc, jnp.where(act, x, -jnp.inf).astype(acc.dtype))

    return jax.tree.map(upd, stats, info)
