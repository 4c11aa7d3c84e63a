r"""The bottleneck problem and member logits on a mesh (``vocab`` and ``batch`` axes).

:math:`A^\top p = \sum_{\text{shards } s} A_s^\top p_s` is a local product plus an all-reduce
of a length-``D`` vector and :math:`A z` stays local, so ``v x D`` never has to fit on one device.
A ``v`` that is not a multiple of the vocabulary axis size is padded: zero rows in ``A``/``Q``
and ``-inf`` logits for the pad tokens, which every objective then gives probability 0
(:func:`pad_problem`, :func:`pad_logits`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float
from typing import Any

from jaxens.combiners.base import Combiner
from jaxens.combiners.bottleneck import BottleneckState, bottleneck
from jaxens.problem import BottleneckProblem
from jaxens.sharding.config import ShardingConfig, config_for, constrain, row_spec


def pad_problem(problem: BottleneckProblem, v_pad: int) -> BottleneckProblem:
    """The same problem over ``v_pad >= v`` tokens: zero rows appended to ``A`` and ``Q``.

    With ``-inf`` logits for the pad tokens (:func:`pad_logits`) every objective puts zero mass
    on them (they are masked), ``A^T p`` and ``Q^T p`` are unchanged for such ``p``, and the
    Gram matrices (hence ``T_pinv`` and the Lipschitz constants) are unchanged.
    """
    v = problem.vocab_size
    if v_pad < v:
        raise ValueError(f"v_pad={v_pad} is smaller than the problem's vocabulary v={v}")
    if v_pad == v:
        return problem
    pad = lambda M: jnp.pad(M, ((0, v_pad - v), (0, 0)))  # noqa: E731
    return problem.with_A(pad(problem.A), Q=pad(problem.Q))


def problem_shardings(problem: BottleneckProblem, config: ShardingConfig) -> BottleneckProblem:
    """A pytree like ``problem`` holding the :class:`NamedSharding` of each array (for ``jax.jit``)."""
    rows = config.sharding(config.vocab_axis, None)
    rep = config.replicated()
    return dataclasses.replace(
        problem, A=rows, Q=rows, T_pinv=rep, lipschitz_hard=rep, lipschitz_members=rep,
        A_con=None if problem.A_con is None else rows,
    )


def shard_problem(
    problem: BottleneckProblem, mesh: Mesh | ShardingConfig, vocab_axis: str = "vocab", *, pad: bool = True
) -> BottleneckProblem:
    """Place ``problem`` on ``mesh``: ``A``/``Q`` split by rows over ``vocab_axis``, the rest replicated.

    When ``v`` is not a multiple of the axis size the problem is padded (:func:`pad_problem`;
    its ``vocab_size`` grows: pad the member logits with :func:`pad_logits` /
    :func:`shard_logits`), or, with ``pad=False``, a ``ValueError`` is raised.
    """
    cfg = config_for(mesh, {"vocab_axis": vocab_axis}, {"batch_axis": "batch", "model_axis": "model"})
    v = problem.vocab_size
    v_pad = cfg.padded_vocab(v)
    if v_pad != v:
        if not pad:
            raise ValueError(
                f"vocabulary size v={v} is not divisible by the {cfg.vocab_size} devices of mesh axis "
                f"{cfg.vocab_axis!r}; pass pad=True (pads to v={v_pad} with masked tokens)"
            )
        problem = pad_problem(problem, v_pad)
    return jax.device_put(problem, problem_shardings(problem, cfg))


def pad_logits(logits: Any, v_pad: int) -> Any:
    """Pad the last axis of ``logits`` (an array or a list of arrays) to ``v_pad`` with ``-inf``."""
    if isinstance(logits, (list, tuple)):
        return type(logits)(pad_logits(l, v_pad) for l in logits)
    x = jnp.asarray(logits)
    v = x.shape[-1]
    if v_pad < v:
        raise ValueError(f"v_pad={v_pad} is smaller than the logits' vocabulary {v} (shape {x.shape})")
    if v_pad == v:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, v_pad - v)], constant_values=-jnp.inf)


def shard_logits(
    logits: Any,
    mesh: Mesh | ShardingConfig,
    batch_axis: str | None = "batch",
    vocab_axis: str | None = "vocab",
    *,
    pad: bool = True,
) -> Any:
    """Place member logits on ``mesh`` sharded ``(batch, vocab)``.

    ``logits``: one ``(B, v)`` array, a list of them (one per member), or ``(B, n, v)``.
    ``B`` must be a multiple of the batch axis size (``ValueError`` otherwise); ``v`` is padded
    with ``-inf`` to a multiple of the vocabulary axis size (``pad=False``: ``ValueError``).
    """
    cfg = config_for(mesh, {"batch_axis": batch_axis, "vocab_axis": vocab_axis}, {"model_axis": "model"})
    if isinstance(logits, (list, tuple)):
        return type(logits)(shard_logits(l, cfg, pad=pad) for l in logits)
    x = jnp.asarray(logits)
    if x.ndim not in (2, 3):
        raise ValueError(f"logits must be (B, v) or (B, n, v), got shape {x.shape}")
    cfg.check_batch(x.shape[0])
    v = x.shape[-1]
    v_pad = cfg.padded_vocab(v)
    if v_pad != v and not pad:
        raise ValueError(
            f"vocabulary size v={v} (logits shape {x.shape}) is not divisible by the {cfg.vocab_size} devices "
            f"of mesh axis {cfg.vocab_axis!r}; pass pad=True (pads with -inf to v={v_pad})"
        )
    return jax.device_put(pad_logits(x, v_pad), cfg.logits_sharding(x.ndim))


def process_local_logits(local: Float[Array, "b v"] | np.ndarray, config: ShardingConfig) -> Array:
    """A global ``(B, v)`` array from each process's own rows ``(B / processes, v)``.

    Every process passes the logits of its slice of the batch (its own prompts); the result is
    one global array sharded ``(batch, vocab)`` (:func:`jax.make_array_from_process_local_data`),
    ready for a jitted :func:`sharded_bottleneck` combine.  ``v`` must already be a multiple of
    the vocabulary axis size (:func:`pad_logits`).
    """
    local = np.asarray(local)
    v = local.shape[-1]
    if v % config.vocab_size:
        raise ValueError(
            f"vocabulary size v={v} is not divisible by the {config.vocab_size} devices of mesh axis "
            f"{config.vocab_axis!r}; pad it first with pad_logits(x, {config.padded_vocab(v)})"
        )
    B = local.shape[0] * jax.process_count()
    config.check_batch(B)
    return jax.make_array_from_process_local_data(config.logits_sharding(local.ndim), local, (B,) + local.shape[1:])


def sharded_bottleneck(
    problem: BottleneckProblem, config: ShardingConfig, objective: str = "kl", **options
) -> Combiner:
    """:func:`jaxens.combiners.bottleneck.bottleneck` on a mesh.

    ``problem`` is padded (if ``v`` is not a multiple of the vocabulary axis size) and placed
    with :func:`shard_problem`; ``combine`` takes the members' *unpadded* ``(B, v)`` logits,
    pads them with ``-inf``, constrains them to ``(batch, vocab)`` and returns ``log p`` and the
    :class:`~jaxens.Solution` with ``p`` cut back to ``(B, v)``.  The warm starts in the state are
    kept sharded over ``batch`` (and ``vocab`` for length-``v`` iterates).  Use it like the
    unsharded combiner, under ``jax.jit`` or in a :class:`ShardedDecoder`; ``options`` go to
    :func:`~jaxens.combiners.bottleneck.bottleneck`.
    """
    v = problem.vocab_size
    v_pad = config.padded_vocab(v)
    sp = shard_problem(problem, config)
    inner = bottleneck(sp, objective, **options)
    prob_sh = problem_shardings(sp, config)

    def constrain_state(state: BottleneckState) -> BottleneckState:
        warm = jax.tree.map(lambda w: constrain(w, NamedSharding(config.mesh, row_spec(config, w, v_pad))), state.warm)
        valid = constrain(state.valid, config.sharding(config.batch_axis))
        prob = jax.tree.map(constrain, state.problem, prob_sh)
        return BottleneckState(warm, valid, prob)

    def init(batch_size: int) -> BottleneckState:
        config.check_batch(batch_size)
        state = inner.init(batch_size)
        # a fresh copy of the problem (a decode loop donates its state) with explicit shardings
        warm = jax.device_put(
            state.warm, jax.tree.map(lambda w: NamedSharding(config.mesh, row_spec(config, w, v_pad)), state.warm)
        )
        valid = jax.device_put(state.valid, config.sharding(config.batch_axis))
        prob = jax.device_put(jax.tree.map(jnp.copy, state.problem), prob_sh)
        return BottleneckState(warm, valid, prob)

    def combine(logits, state):
        logits = list(logits)
        B = jnp.shape(logits[0])[0]
        config.check_batch(B)
        sh = config.logits_sharding()
        x = [constrain(pad_logits(jnp.asarray(l), v_pad), sh) for l in logits]
        if state is not None:
            state = constrain_state(state)
        logp, state, sol = inner.combine(x, state)
        state = constrain_state(state)
        logp = constrain(logp, sh)[:, :v]
        sol = sol._replace(p=constrain(sol.p, sh)[..., :v])
        return logp, state, sol

    return Combiner(init, combine)
