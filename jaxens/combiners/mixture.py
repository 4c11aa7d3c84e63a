r"""ME: the mixture-model-like ensemble (one member's forward pass per decoding step).

At step :math:`t` one member :math:`i_t \sim \mathrm{Categorical}(w)` is drawn *for the whole
batch* and the next token of every row is sampled from that member alone,
:math:`y_{b,t} \sim \hat p_{i_t}(\cdot \mid y_{b,<t})`.  Because :math:`i_t` is independent of
the rows and of the past, the per-step distribution of every row is exactly the mixture

.. math::  P(y_{b,t} = j \mid y_{b,<t}) = \sum_i \tilde w_i \, \hat p_{ij}, \qquad
           \tilde w_i = w_i / \textstyle\sum_k w_k,

i.e. probability averaging (:func:`jaxens.prob_average`), and so is the distribution of whole
sequences, while only one member runs per step (ME: "Mixture-model-like Ensemble"; see
``SOURCES.md`` section 2).  With ``temperature`` :math:`T` each member's distribution is
:math:`\mathrm{softmax}(\ell_i / T)` and the exact counterpart is
``prob_average(weights, temperature=T)`` with plain sampling.

**Pending tokens and catch-up.**  Member caches share the slot layout of the token buffer.  A
member that was not drawn keeps the new tokens *pending*; when it is next drawn it runs one
chunked prefill over all its pending tokens at once (a forward of ``T >= pending``
tokens, the smallest of the static chunk sizes ``1, 2, 3, 4, 6, 8, 12, ..., max_pending`` (powers of
two and their midpoints: a chunk wastes at most a third of its positions); the extra
positions of the chunk write garbage into future slots which are overwritten before any real
query can attend to them), and its logits at the last pending token give the step's
distribution (members that accept the ``logits=`` keyword of :mod:`jaxens.models.base`
unembed only that one position).  The pending buffer is bounded: a member whose pending count
reaches ``max_pending`` at the start of a step is caught up *eagerly* in that step even though
it was not drawn (a forward of ``max_pending`` tokens that computes no logits at all, only the
cache update), so no member ever needs a chunk longer than ``max_pending`` and the cache needs
only ``max_pending`` slots of slack.  Eager catch-ups are counted in the statistics.

**Cost.**  Each member is a ``lax.switch`` over {skip, eager catch-up, chunk of each size}
whose index depends only on the drawn member and the pending counts (shared by the whole
batch), so a member that is neither drawn nor full runs nothing in that step.

**Unusable logits.**  A row where the drawn member's logits hold NaN / ``+inf`` or are ``-inf`` on
every token samples from the uniform distribution at that step (never NaN), flagged per row in
:attr:`MEStepInfo.nonfinite` and counted per member in :attr:`MEStats.nonfinite_draws`.

**Truncating samplers are not exact under ME.**  Sampling token :math:`j` from
:math:`\hat p_{i}` with probability :math:`w_i` reproduces the mixture only for *plain*
sampling.  Greedy, top-k, top-p and min-p of the mixture need every member's distribution,
which ME does not compute.  The published ME code applies them to the drawn member instead (so
"greedy ME" is the argmax of a randomly drawn member, not the argmax of the mixture).  jaxens:

* by default ME accepts only a plain sampler (``Sampler()``: temperature 1, no truncation) and
  takes the member temperature as :attr:`MixtureEnsemble.temperature`; anything else raises a
  ``ValueError`` that points to the exact alternative: the ordinary decode loop with the
  ``prob_average`` combiner, which truncates the combined distribution;
* with ``per_member_truncation=True`` the sampler (temperature, top-k/p, min-p, greedy) is
  applied to the drawn member's distribution, reproducing the published behaviour, documented
  as *not* the mixture's truncation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxens.combiners.averaging import prob_average
from jaxens.combiners.base import Combiner, check_weights, normalized_weights, unusable_members


class MEStepInfo(NamedTuple):
    member: Int[Array, ""]  # member drawn this step
    processed: Int[Array, " n"]  # pending tokens each member consumed this step
    eager: Bool[Array, " n"]  # member was caught up eagerly (pending buffer full, not drawn)
    nonfinite: Bool[Array, " B"]  # the drawn member's row held NaN / +inf / all -inf: uniform this step


class MEStats(NamedTuple):
    """ME diagnostics aggregated over a decode."""

    draws: Int[Array, " n"]  # steps on which member i was drawn
    forward_tokens: Int[Array, " n"]  # tokens member i ran its forward on (incl. prompt tail)
    eager_catchups: Int[Array, " n"]  # eager catch-ups of member i
    nonfinite_draws: Int[Array, " n"]  # steps member i was drawn and gave some row NaN / +inf / all -inf


@dataclasses.dataclass(frozen=True)
class MixtureEnsemble:
    r"""Static ME settings (hashable): each step draws one member :math:`i_t \sim \mathrm{Categorical}(\tilde w)`
    for the whole batch and samples every row from it, so each row's token follows the mixture
    :math:`\sum_i \tilde w_i\, \mathrm{softmax}(\ell_i / T)` (see the module doc).

    Example::

        ens = MixtureEnsemble(weights=(0.5, 0.5), max_pending=8)
        out = Decoder([m1, m2], ens, Sampler()).generate(prompts, 16)
        out.stats.draws                     # steps on which each member was drawn

    Attributes:
      weights: mixture weights ``w_i >= 0`` (normalised), ``None`` for uniform.
      temperature: member temperature ``T > 0``: member ``i`` samples from ``softmax(l_i / T)``.
      max_pending: bound on the pending tokens of a member (chunk size of the catch-up).
      per_member_truncation: apply a truncating sampler to the drawn member (not exact; see
        the module doc).
    """

    weights: tuple[float, ...] | None = None
    temperature: float = 1.0
    max_pending: int = 8
    per_member_truncation: bool = False

    def __post_init__(self):
        if self.weights is not None:
            w = tuple(float(x) for x in check_weights(self.weights, None, np.float64, owner="ME"))
            object.__setattr__(self, "weights", w)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"ME temperature must be a finite number > 0, got {t!r}")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {self.max_pending!r}")

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Static catch-up chunk lengths ``1, 2, 3, 4, 6, 8, 12, ... < max_pending`` and ``max_pending``.

        Powers of two and their midpoints ``3 * 2^k``: padding wastes at most a third of a chunk
        (plain powers of two waste up to half, e.g. 3 pending tokens in a chunk of 4), at the
        price of a few more ``lax.switch`` branches to compile.
        """
        sizes, s = [], 1
        while s < self.max_pending:
            sizes.append(s)
            if s >= 2 and s + s // 2 < self.max_pending:
                sizes.append(s + s // 2)
            s *= 2
        return tuple(sizes) + (self.max_pending,)

    def normalized_weights(self, n: int) -> Float[Array, " n"]:
        r""":math:`\tilde w = w / \sum_k w_k` for ``n`` members (float32; uniform when ``weights`` is None)."""
        return jnp.asarray(normalized_weights(self.weights, n, jnp.float32, owner="ME"))

    def exact_combiner(self) -> Combiner:
        """The combiner whose plain sampling ME reproduces exactly: probability averaging."""
        return prob_average(None if self.weights is None else jnp.asarray(self.weights), self.temperature)

    def check_sampler(self, sampler) -> None:
        if self.per_member_truncation or sampler.is_plain:
            return
        raise ValueError(
            f"ME samples exactly from the probability average only with plain sampling, got {sampler}. "
            "Set the member temperature with me(temperature=...) and use Sampler(); for greedy / top-k / "
            "top-p / min-p of the mixture use the prob_average combiner in the ordinary decode loop (exact); "
            "or pass me(per_member_truncation=True) to truncate the drawn member's distribution (the "
            "published ME behaviour, NOT the mixture's truncation)"
        )

    def init_stats(self, n: int) -> MEStats:
        z = jnp.zeros((n,), jnp.int32)
        return MEStats(z, z, z, z)

    def update_stats(self, stats: MEStats, info: MEStepInfo) -> MEStats:
        n = stats.draws.shape[0]
        return MEStats(
            stats.draws + (jnp.arange(n) == info.member).astype(jnp.int32),
            stats.forward_tokens + info.processed,
            stats.eager_catchups + info.eager.astype(jnp.int32),
            stats.nonfinite_draws + ((jnp.arange(n) == info.member) & jnp.any(info.nonfinite)).astype(jnp.int32),
        )


def me(
    weights: Sequence[float | int] | ArrayLike | None = None,
    *,
    temperature: float = 1.0,
    max_pending: int = 8,
    per_member_truncation: bool = False,
) -> MixtureEnsemble:
    """ME with mixture weights ``weights`` (uniform when ``None``); see the module doc."""
    if weights is not None:
        weights = tuple(float(x) for x in jax.device_get(jnp.ravel(jnp.asarray(weights))))
    return MixtureEnsemble(weights, temperature, max_pending, per_member_truncation)


# forward(member_index, chunk_length (static), cache, start_slot, logits=...) -> (logits, cache), with
# ``logits`` as in jaxens/models/base.py: "all" -> (B, T, v), an int t -> (B, 1, v) at t, "none" -> None
Forward = Callable[..., tuple[Float[Array, "B T v"] | None, Any]]


def me_step(
    ens: MixtureEnsemble,
    forward: Forward,
    caches: tuple,
    cached: Int[Array, " n"],
    length: Int[Array, ""],
    key: Array,
    out_shape: tuple[int, int],
) -> tuple[Float[Array, "B v"], tuple, Int[Array, " n"], MEStepInfo]:
    """One ME step: draw a member, catch it (and any member whose buffer is full) up.

    ``cached[j]`` is the number of token-buffer slots already in member ``j``'s cache and
    ``length`` the number of filled slots, so member ``j`` has ``length - cached[j]`` pending
    tokens (at least 1, at most ``max_pending``).  Returns the drawn member's log-probabilities
    at temperature ``ens.temperature`` for the token after slot ``length - 1``.
    """
    n = len(caches)
    logw = jnp.log(ens.normalized_weights(n))
    drawn = jax.random.categorical(key, logw).astype(jnp.int32)
    sizes = ens.chunk_sizes
    P = ens.max_pending
    new_caches, outs, processed, eager, new_cached = [], [], [], [], []
    for j in range(n):
        pending = length - cached[j]
        is_drawn = drawn == j
        run = is_drawn | (pending >= P)
        size_index = sum((pending > s).astype(jnp.int32) for s in sizes[:-1]) if len(sizes) > 1 else 0
        # 0: skip (nothing runs), 1: eager catch-up (no logits), 2 + k: drawn, chunk sizes[k]
        branch = jnp.where(is_drawn, 2 + size_index, jnp.where(run, 1, 0))

        def skip(cache):
            return jnp.zeros(out_shape, jnp.float32), cache

        def catch_up(cache, j=j):
            _, cache = forward(j, P, cache, cached[j], logits="none")
            return jnp.zeros(out_shape, jnp.float32), cache

        def make_chunk(T, j=j, pending=pending):
            def chunk(cache):
                logits, cache = forward(j, T, cache, cached[j], logits=pending - 1)
                return logits[:, 0].astype(jnp.float32), cache

            return chunk

        out, cache = jax.lax.switch(branch, [skip, catch_up] + [make_chunk(T) for T in sizes], caches[j])
        new_caches.append(cache)
        outs.append(out)
        processed.append(jnp.where(run, pending, 0))
        eager.append(run & (drawn != j))
        new_cached.append(jnp.where(run, length, cached[j]))
    logits = jnp.stack(outs)[drawn]
    bad = unusable_members([logits])[:, 0]
    logits = jnp.where(bad[:, None], 0.0, logits)  # an unusable row (NaN, +inf, all -inf) is uniform, never NaN
    log_probs = jax.nn.log_softmax(logits / ens.temperature, axis=-1)
    info = MEStepInfo(drawn, jnp.stack(processed).astype(jnp.int32), jnp.stack(eager), bad)
    return log_probs, tuple(new_caches), jnp.stack(new_cached).astype(jnp.int32), info
