r"""Combiners by name: the registry behind ``--combiner`` and :func:`make_combiner`.

``COMBINERS[name](members, weights=None, temperature=1.0, **options)`` builds a
:class:`~jaxens.combiners.base.Combiner` or a :class:`~jaxens.combiners.mixture.MixtureEnsemble`.
Built in: ``logit_average``, ``prob_average``, ``me`` and ``bottleneck-<objective>`` for every
objective of :data:`jaxens.objectives.OBJECTIVES` (:func:`bottleneck_combiner`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.base import Combiner, unusable_members
from jaxens.combiners.bottleneck import bottleneck
from jaxens.combiners.mixture import MixtureEnsemble, me
from jaxens.decode.api import shared_vocab_size
from jaxens.objectives import OBJECTIVES
from jaxens.problem import make_problem

# name -> factory(members, weights=None, temperature=1.0, **options) -> Combiner | MixtureEnsemble
COMBINERS: dict[str, Callable[..., Combiner | MixtureEnsemble]] = {}


def register_combiner(name: str, factory: Callable[..., Combiner | MixtureEnsemble]) -> None:
    """Register ``factory(members, weights=None, temperature=1.0, **options)`` under ``name``.

    Example::

        register_combiner("first", lambda members, weights=None, temperature=1.0:
                          logit_average(jnp.eye(len(members))[0], temperature))
        make_combiner("first", members)          # decodes with member 0 alone
    """
    COMBINERS[name] = factory


def make_combiner(name: str, members: Sequence[Any], **options) -> Combiner | MixtureEnsemble:
    """Build a registered combiner by name; unknown names list the known ones.

    Example::

        comb = make_combiner("prob_average", members, weights=[0.7, 0.3])
        # = prob_average(weights=[0.7, 0.3]):  p = sum_i w_i softmax(l_i) / sum_i w_i
    """
    if name not in COMBINERS:
        raise ValueError(f"unknown combiner {name!r}; known combiners: {', '.join(sorted(COMBINERS))}")
    return COMBINERS[name](members, **options)


class BottleneckDecodeInfo(NamedTuple):
    """Per-step diagnostics of a bottleneck combiner in the decode loop (per row).

    Aggregated by the decoder (:mod:`jaxens.decode.stats`) into ``status``: a histogram over
    :class:`jaxens.solvers.solution.Status` codes (``(B, 8)``: steps each row ended SOLVED /
    MAX_ITERS / INFEASIBLE / ...), maxima over the steps of ``iterations``,
    ``primal_residual`` and ``gap``, and ``bad_members`` ``(B, n)``: steps on which member ``i``'s
    logits for row ``b`` were unusable (NaN / ``+inf`` / all ``-inf``; the row is then
    ``NONFINITE_INPUT``, see :func:`jaxens.combiners.base.unusable_members`).
    """

    status: Int[Array, " B"]
    iterations: Float[Array, " B"]
    primal_residual: Float[Array, " B"]
    gap: Float[Array, " B"]
    bad_members: Bool[Array, "B n"]


def _hard_members(hard: Any) -> Any:
    if hard is None or (isinstance(hard, str) and hard.lower() == "none"):
        return ()
    if isinstance(hard, str):
        if hard.lower() != "all":
            raise ValueError(f"hard must be 'all', 'none' or member indices, got {hard!r}")
        return "all"
    return tuple(int(i) for i in hard)


def bottleneck_combiner(
    members: Sequence[Any],
    objective: str = "kl",
    *,
    weights=None,
    temperature: float = 1.0,
    hard: Sequence[int] | str | None = "all",
    soft: Sequence[int] | None = None,
    rho=None,
    lam: float = 0.0,
    solver: Any = None,
    vocab_size: int | None = None,
    dtype=jnp.float32,
    **options,
) -> Combiner:
    """The bottleneck combiner for ``members``, for the decode loop.

    Builds the :class:`jaxens.problem.BottleneckProblem` once from the members' ``unembedding()``
    ``(W_i, b_i)`` (the first ``vocab_size`` rows; default the common ``config.vocab_size``) and
    returns :func:`jaxens.combiners.bottleneck.bottleneck` whose per-step ``info`` is reduced to a
    :class:`BottleneckDecodeInfo` (the decode loop histograms the solver statuses).

    ``hard``: ``"all"`` (default), ``"none"``/``()`` or member indices; ``soft``: member indices
    with strengths ``rho``; ``lam``: smoothing towards the logit average.  ``temperature`` must
    be 1: the bottleneck distribution is defined by the members' own distributions; temper
    the *combined* distribution with the sampler's temperature instead.
    """
    if temperature != 1.0:
        raise ValueError(
            f"the bottleneck combiners take no member temperature (got {temperature}); use "
            "Sampler(temperature=...) (CLI: --temperature) to temper the combined distribution"
        )
    members = list(members)
    if vocab_size is None:
        vocab_size = shared_vocab_size(members)
    Ws, bs = [], []
    for i, m in enumerate(members):
        W, b = m.unembedding()
        if W.shape[0] < vocab_size:
            raise ValueError(f"member {i} has an unembedding of shape {W.shape}, fewer than vocab_size={vocab_size} rows")
        Ws.append(W[:vocab_size])
        bs.append(None if b is None else b[:vocab_size])
    problem = make_problem(Ws, bs, hard=_hard_members(hard), soft=soft, dtype=dtype)
    if weights is not None:
        weights = jnp.asarray(weights, dtype)
    comb = bottleneck(problem, objective, weights=weights, rho=rho, lam=lam, solver=solver, **options)

    def init(batch_size: int):
        # BottleneckState carries the problem (an argument of the compiled loop, not a baked
        # constant).  A fresh copy: the decode loop donates its state, and the problem must
        # outlive a call.
        state = comb.init(batch_size)
        return state._replace(problem=jax.tree.map(jnp.copy, state.problem))

    def combine(logits, state):
        logp, state, sol = comb.combine(logits, state)
        info = BottleneckDecodeInfo(
            sol.status.astype(jnp.int32),
            sol.iterations.astype(jnp.float32),
            sol.primal_residual.astype(jnp.float32),
            sol.gap.astype(jnp.float32),
            unusable_members(logits),
        )
        return logp, state, info

    return Combiner(init, combine)


def _register_builtin():
    register_combiner(
        "logit_average", lambda members, weights=None, temperature=1.0: logit_average(weights, temperature)
    )
    register_combiner("prob_average", lambda members, weights=None, temperature=1.0: prob_average(weights, temperature))
    register_combiner(
        "me",
        lambda members, weights=None, temperature=1.0, max_pending=8, per_member_truncation=False: me(
            weights, temperature=temperature, max_pending=max_pending, per_member_truncation=per_member_truncation
        ),
    )
    for objective in OBJECTIVES:
        register_combiner(
            f"bottleneck-{objective}",
            lambda members, objective=objective, **options: bottleneck_combiner(members, objective, **options),
        )


_register_builtin()
