r"""The compiled decode loop: members -> combiner -> sampler, in one ``lax.while_loop``.

Data path per step::

    last tokens -> each member's forward (KV cache) -> logits l_i (B, v)
                -> combiner.combine([l_1, ..., l_n], state) -> log p (B, v)
                -> sampler (+ optional truncation mask, e.g. BAT) -> y (B,) -> token buffer

or, for ME (:mod:`jaxens.combiners.mixture`), one drawn member's forward per step.

**Layout.**  Prompts are left-padded to a static length ``L`` and written into a token buffer of
``S`` slots (slot ``s`` of every member's cache holds token ``s`` of the buffer).  Row ``b`` has
``pad_b`` padding slots; its token in slot ``s >= pad_b`` has position ``s - pad_b`` and
``kv_mask[b, s] = s >= pad_b``.  The prefill runs every member over slots ``[0, L-1)``; the last
prompt token stays *pending*, so every step has the same form: each member consumes its pending
tokens and returns the logits for the next slot.

**Stopping.**  Row ``b`` stops after a token in ``stop`` (not counted in its length) or after
``max_new[b]`` tokens; finished rows emit ``pad_id``.  The loop ends when every row has stopped
or at the step bound ``until`` (an array: streaming re-enters the same compiled loop).  The PRNG
key is split every step.

The host side (validation, padding, buckets, streaming) is :class:`jaxens.decode.api.Decoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxens.combiners.base import Combiner
from jaxens.combiners.mixture import MixtureEnsemble, me_step
from jaxens.decode.stats import init_stats, update_stats
from jaxens.models.base import KVCache
from jaxens.models.layers import select_positions
from jaxens.sampling import Sampler

# truncation(combined_log_probs (B, v), member_logits [(B, v)] * n) -> allowed (B, v)
Truncation = Callable[[Float[Array, "B v"], Sequence[Float[Array, "B v"]]], Bool[Array, "B v"]]


class DecodeState(NamedTuple):
    """The loop carry (all arrays; shapes fixed for a compile)."""

    step: Int[Array, ""]  # decoding steps done
    key: Array  # PRNG key, split every step
    tokens: Int[Array, "B S"]  # left-padded prompt, then the generated tokens
    length: Int[Array, ""]  # filled slots of `tokens` (L + step)
    pad: Int[Array, " B"]  # left padding of each row
    done: Bool[Array, " B"]
    finished: Bool[Array, " B"]  # row produced a stop token
    num_generated: Int[Array, " B"]  # generated tokens, stop token excluded
    max_new: Int[Array, " B"]
    stop: Int[Array, " k"]
    caches: tuple  # one KVCache per member
    cached: Int[Array, " n"]  # slots already in each member's cache
    combiner_state: Any
    stats: Any  # aggregated diagnostics (jaxens.decode.stats)


class DecodeHooks(NamedTuple):
    """Placement callbacks of a :class:`~jaxens.decode.api.Decoder` (each optional).

    Attributes:
      params: ``params(state) -> state``, called once per member on the host with the member's
        ``nnx.State`` (its weights); returns the state to run with, e.g. placed with
        ``jax.device_put`` on a mesh.
      state: ``state(s) -> s`` on a traced :class:`DecodeState`: applied to the prefill's output
        and to each step's input and output (e.g. ``lax.with_sharding_constraint`` on the
        caches and per-row counters).  It must not change values, only their placement.
      batch: ``batch(B)``, called on the host before the prefill with the number of prompts;
        raises ``ValueError`` for a batch the placement cannot hold.

    Example (pin the carry to one device)::

        dev = jax.devices()[0]
        hooks = DecodeHooks(params=lambda s: jax.device_put(s, dev))
        Decoder(members, logit_average(), hooks=hooks)
    """

    params: Callable[[Any], Any] | None = None
    state: Callable[[DecodeState], DecodeState] | None = None
    batch: Callable[[int], None] | None = None


def _identity(x):
    return x


class DecodeLoop:
    """The traced functions of a decoder over static settings (members' graphs, combiner, sampler).

    ``prefill(states, prompt, pad, max_new, stop, key, cstate, cache_len=S) -> DecodeState`` and
    ``run(states, state, until) -> DecodeState`` are pure in their array arguments (``states``:
    the members' ``nnx.State``); :class:`~jaxens.decode.api.Decoder` jits them.
    ``num_traces`` counts how often each was traced (one per compile).
    """

    def __init__(
        self,
        graphdefs: tuple,
        logits_kw: tuple[bool, ...],
        combiner: Combiner | MixtureEnsemble,
        sampler: Sampler,
        *,
        vocab_size: int,
        pad_id: int,
        truncation: Truncation | None = None,
        cache_dtype=None,
        constrain_state: Callable[[DecodeState], DecodeState] | None = None,
    ):
        self.graphdefs = graphdefs
        self.logits_kw = logits_kw
        self.combiner = combiner
        self.sampler = sampler
        self.vocab_size = int(vocab_size)
        self.pad_id = int(pad_id)
        self.truncation = truncation
        self.cache_dtype = cache_dtype
        self.constrain = _identity if constrain_state is None else constrain_state
        self.is_me = isinstance(combiner, MixtureEnsemble)
        self.num_traces = {"prefill": 0, "run": 0}

    def forward_fn(self, models, tokens, pad):
        """``forward(j, T, cache, start, logits)``: member ``j`` on slots ``[start, start + T)``."""
        S = tokens.shape[1]
        kv_mask = jnp.arange(S)[None, :] >= pad[:, None]
        V = self.vocab_size

        def forward(j: int, T: int, cache: KVCache, start, logits="all"):
            """Member ``j`` on slots ``[start, start + T)``; ``logits`` as in ``models/base.py``."""
            toks = jax.lax.dynamic_slice_in_dim(tokens, start, T, axis=1)
            pos = jnp.maximum(start + jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None], 0)
            args = (toks, pos.astype(jnp.int32), cache, jnp.asarray(start, jnp.int32), kv_mask)
            if self.logits_kw[j]:
                out, cache = models[j](*args, logits=logits)
            else:  # a member without the optional keyword: full logits, then select
                out, cache = models[j](*args)
                out = select_positions(out, logits)
            return (None if out is None else out[..., :V]), cache

        return forward

    def init_combiner_state(self, B: int):
        """Built eagerly (outside ``jit``) and passed to the prefill as an argument, so arrays a
        combiner keeps in its state (e.g. the bottleneck problem) ride in the loop carry instead of
        being baked into the compiled program as constants."""
        return () if self.is_me else self.combiner.init(B)

    def _init_combiner_stats(self, B, cstate, n):
        if self.is_me:
            return (), self.combiner.init_stats(n)
        struct = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), cstate)
        dummy = [jax.ShapeDtypeStruct((B, self.vocab_size), jnp.float32)] * n
        _, _, info = jax.eval_shape(self.combiner.combine, dummy, struct)
        return cstate, init_stats(info)

    def _models(self, states):
        return [nnx.merge(g, s) for g, s in zip(self.graphdefs, states)]

    def prefill(self, states, prompt, pad, max_new, stop, key, cstate, *, cache_len: int) -> DecodeState:
        """Every member over the prompt minus its last token (cache only); the initial carry."""
        self.num_traces["prefill"] += 1
        models = self._models(states)
        B, L = prompt.shape
        tokens = jnp.full((B, cache_len), self.pad_id, jnp.int32).at[:, :L].set(prompt)
        forward = self.forward_fn(models, tokens, pad)
        caches = []
        for j, m in enumerate(models):
            cache = m.init_cache(B, cache_len, self.cache_dtype)
            if L > 1:  # the prompt minus its last token: cache only, no logits
                _, cache = forward(j, L - 1, cache, jnp.int32(0), logits="none")
            caches.append(cache)
        cstate, stats = self._init_combiner_stats(B, cstate, len(models))
        return self.constrain(
            DecodeState(
                step=jnp.int32(0),
                key=key,
                tokens=tokens,
                length=jnp.int32(L),
                pad=pad,
                done=max_new <= 0,
                finished=jnp.zeros((B,), bool),
                num_generated=jnp.zeros((B,), jnp.int32),
                max_new=max_new,
                stop=stop,
                caches=tuple(caches),
                cached=jnp.full((len(models),), L - 1, jnp.int32),
                combiner_state=cstate,
                stats=stats,
            )
        )

    def step(self, models, s: DecodeState) -> DecodeState:
        """One decoding step: logits -> combined log-probs -> a token per active row."""
        s = self.constrain(s)
        B = s.tokens.shape[0]
        forward = self.forward_fn(models, s.tokens, s.pad)
        active = ~s.done
        if self.is_me:
            key, k_me, k_tok = jax.random.split(s.key, 3)
            logp, caches, cached, info = me_step(
                self.combiner, forward, s.caches, s.cached, s.length, k_me, (B, self.vocab_size)
            )
            cstate = s.combiner_state
            stats = self.combiner.update_stats(s.stats, info)
            mask = None
        else:
            key, k_tok = jax.random.split(s.key)
            logits, caches = [], []
            for j in range(len(models)):
                l, c = forward(j, 1, s.caches[j], s.length - 1, logits="last")
                logits.append(l[:, 0])
                caches.append(c)
            caches = tuple(caches)
            cached = jnp.full_like(s.cached, s.length)
            logp, cstate, info = self.combiner.combine(logits, s.combiner_state)
            if logp.shape != (B, self.vocab_size):
                raise ValueError(f"combiner returned log-probs of shape {logp.shape}, expected {(B, self.vocab_size)}")
            stats = update_stats(s.stats, info, active)
            mask = None if self.truncation is None else self.truncation(logp, logits)
        tok = self.sampler(logp, k_tok, mask)
        tok = jnp.where(active, tok, self.pad_id).astype(jnp.int32)
        is_stop = jnp.any(tok[:, None] == s.stop[None, :], axis=-1) & active
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.length, axis=1)
        step = s.step + 1
        return self.constrain(
            s._replace(
                step=step,
                key=key,
                tokens=tokens,
                length=s.length + 1,
                done=s.done | is_stop | (step >= s.max_new),
                finished=s.finished | is_stop,
                num_generated=s.num_generated + (active & ~is_stop).astype(jnp.int32),
                caches=caches,
                cached=cached,
                combiner_state=cstate,
                stats=stats,
            )
        )

    def run(self, states, s: DecodeState, until) -> DecodeState:
        """``lax.while_loop`` of :meth:`step` while ``step < until`` and some row is active."""
        self.num_traces["run"] += 1
        models = self._models(states)
        return jax.lax.while_loop(
            lambda s: (s.step < until) & ~jnp.all(s.done),
            lambda s: self.step(models, s),
            s,
        )
