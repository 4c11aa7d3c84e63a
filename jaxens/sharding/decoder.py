r""":class:`ShardedDecoder`: the decode loop on a device mesh, through :class:`~jaxens.decode.loop.DecodeHooks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxens.combiners.base import Combiner
from jaxens.decode.api import Decoder
from jaxens.decode.loop import DecodeHooks, DecodeState
from jaxens.models.base import KVCache
from jaxens.sharding.config import ShardingConfig, constrain, row_spec
from jaxens.sharding.params import ParamRule, shard_params


def constrain_logits(comb: Combiner, config: ShardingConfig) -> Combiner:
    """``comb`` with its member logits ``(B, v)`` constrained to ``(batch, vocab)`` (when ``v`` divides)."""

    def combine(logits, state):
        v = jnp.shape(logits[0])[-1]
        if v % config.vocab_size == 0:
            logits = [constrain(l, config.logits_sharding()) for l in logits]
        return comb.combine(logits, state)

    return Combiner(comb.init, combine)


def _small(config: ShardingConfig, x):
    """Per-row bookkeeping: over ``batch`` on one process, replicated across processes."""
    if jax.process_count() > 1:
        return constrain(x, config.replicated())
    return constrain(x, NamedSharding(config.mesh, row_spec(config, x, None)))


def _constrain_cache(config: ShardingConfig, c: KVCache) -> KVCache:
    def one(x):
        if x.ndim != 5:
            return x
        K = x.shape[3]
        heads = config.model_axis if (config.model_axis is not None and K % config.model_size == 0) else None
        return constrain(x, config.sharding(None, config.batch_axis, None, heads, None))

    return KVCache(one(c.k), one(c.v))


def constrain_decode_state(config: ShardingConfig, s: DecodeState) -> DecodeState:
    """The loop carry's placement on the mesh (values unchanged).

    Token buffer, per-row counters and per-row diagnostics over ``batch`` (replicated across
    processes); KV caches ``[L, B, S, K, H]`` over ``batch`` and, when ``K`` divides, their KV
    heads over ``model``; the PRNG key and other diagnostics replicated.
    """
    rep = config.replicated()
    B = s.tokens.shape[0]
    small = lambda x: _small(config, x)  # noqa: E731
    stats = jax.tree.map(lambda x: small(x) if (jnp.ndim(x) >= 1 and jnp.shape(x)[0] == B) else constrain(x, rep), s.stats)
    return s._replace(
        key=constrain(s.key, rep),
        tokens=small(s.tokens),
        pad=small(s.pad),
        done=small(s.done),
        finished=small(s.finished),
        num_generated=small(s.num_generated),
        max_new=small(s.max_new),
        caches=tuple(_constrain_cache(config, c) if isinstance(c, KVCache) else c for c in s.caches),
        stats=stats,
    )


def mesh_hooks(config: ShardingConfig, param_rule: ParamRule | None = None) -> DecodeHooks:
    """The :class:`~jaxens.decode.loop.DecodeHooks` that put a :class:`~jaxens.decode.api.Decoder` on ``config.mesh``.

    ``params``: :func:`~jaxens.sharding.params.shard_params` with ``param_rule``; ``state``:
    :func:`constrain_decode_state`; ``batch``: :meth:`ShardingConfig.check_batch`.
    """
    return DecodeHooks(
        params=lambda s: shard_params(s, config, param_rule),
        state=lambda s: constrain_decode_state(config, s),
        batch=config.check_batch,
    )


class ShardedDecoder(Decoder):
    """:class:`jaxens.Decoder` on a device mesh: batch-parallel rows, replicated or sharded members.

    A :class:`~jaxens.decode.api.Decoder` built with :func:`mesh_hooks` (its ``hooks``): the
    decoding state is constrained inside the compiled prefill and loop (token buffer, per-row
    counters and diagnostics over ``batch``; each member's KV cache ``[L, B, S, K, H]`` over
    ``batch`` and its KV heads over ``model`` when divisible); member logits ``(B, v)`` over
    ``(batch, vocab)`` (when ``v`` divides); member parameters placed by
    :func:`~jaxens.sharding.params.shard_params` (``param_rule``).  The combiner is used as
    given otherwise: pass :func:`~jaxens.sharding.problem.sharded_bottleneck` for a
    vocabulary-sharded bottleneck problem.  The tokens equal the single-device decoder's.

    The batch must be a multiple of the batch axis size (``ValueError`` otherwise).  With
    several processes (``jax.distributed.initialize``) every process calls :meth:`generate`
    with the same prompts (SPMD); the small per-row outputs are then replicated so each
    process can read every row.

    Example (8 devices: 2-way batch x 4-way vocabulary)::

        cfg = ShardingConfig(make_mesh(batch=2, vocab=4))
        dec = ShardedDecoder(members, logit_average(), Sampler(greedy=True), config=cfg)
        out = dec.generate(prompts, 16)        # len(prompts) a multiple of 2
    """

    def __init__(self, members, combiner, sampler=None, *, config: ShardingConfig, param_rule: ParamRule | None = None, **kwargs):
        if not isinstance(config, ShardingConfig):
            raise ValueError(f"config must be a jaxens.sharding.ShardingConfig, got {type(config).__name__}")
        if "hooks" in kwargs:
            raise ValueError("ShardedDecoder builds its hooks from config; use Decoder(..., hooks=...) for others")
        self.config = config
        if isinstance(combiner, Combiner):
            combiner = constrain_logits(combiner, config)
        super().__init__(members, combiner, sampler, hooks=mesh_hooks(config, param_rule), **kwargs)
