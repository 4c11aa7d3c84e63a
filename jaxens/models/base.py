"""The contract every member model follows (Llama-style, Gemma 3, GPT-2, trained members).

A member is a Flax NNX module.  The decode loop, ME and the combiners use only this interface:

``model(tokens, positions, cache, cache_index, kv_mask) -> (logits, new_cache)``

* ``tokens``: ``int32[B, T]`` token ids (pad ids anywhere are fine; they are masked).
* ``positions``: ``int32[B, T]`` absolute positions used for the position encoding
  (RoPE / learned); rows that are left-padded start counting at their first real token.
* ``cache``: a :class:`KVCache` with ``S`` slots per row (from ``model.init_cache``).
* ``cache_index``: ``int32[]`` slot where the first of the ``T`` new tokens is written; the
  same for every row (left padding keeps the rows aligned).
* ``kv_mask``: ``bool[B, S]``: slot ``s`` holds a real token of row ``b`` (the caller sets the
  new slots before the call).  Query ``t`` attends to slots ``s <= cache_index + t`` with
  ``kv_mask[b, s]`` (and, for sliding-window layers, ``cache_index + t - s < window``).
* returns ``logits``: ``float32[B, T, V]`` and the cache with the new keys/values written.

Optionally (the built-in families do; :func:`accepts_logits_keyword` tells), a member takes a
keyword ``logits`` that says which positions need logits, so the unembedding (``2 V d`` FLOPs per
position) runs only where they are used:

* ``logits="all"`` (default): ``[B, T, V]`` as above;
* ``logits="last"``: ``[B, 1, V]``, query ``T − 1`` only (the next-token distribution);
* ``logits=t`` (int scalar, may be traced): ``[B, 1, V]`` at query ``t`` (ME catch-up chunks);
* ``logits="none"``: ``None``, only the cache update (prefill, eager ME catch-ups).

Every member also exposes ``unembedding() -> (W[V, d], b[V] | None)`` for the bottleneck
combiner, ``config`` (with ``vocab_size``) and ``init_cache(batch, max_len, dtype)``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Protocol

from jaxtyping import Array, Bool, Float, Int


class KVCache(NamedTuple):
    """Keys and values for every layer, stacked: ``[L, B, S, K, H]`` each."""

    k: Float[Array, "L B S K H"]
    v: Float[Array, "L B S K H"]


class Member(Protocol):
    config: object

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache,
        cache_index: Int[Array, ""],
        kv_mask: Bool[Array, "B S"],
    ) -> tuple[Float[Array, "B T V"], KVCache]: ...

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache: ...

    def unembedding(self) -> tuple[Float[Array, "V d"], Float[Array, " V"] | None]: ...


def accepts_logits_keyword(member) -> bool:
    """Whether ``member(...)`` takes the optional ``logits=`` keyword (see the module doc)."""
    try:
        params = inspect.signature(type(member).__call__).parameters
    except (TypeError, ValueError):
        return False
    return "logits" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
