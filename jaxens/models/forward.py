"""Whole-sequence helpers on top of the member contract: a full forward pass and chunked scoring.

``sequence_nll`` computes ``Σ_{t ≥ 1} −log p(x_t | x_{<t})`` by feeding the sequence through the KV
cache in fixed-size chunks (one compile for every chunk; the last one is right-padded with slots
marked empty), so the ``[T, V]`` logits never exist at once.  Perplexity is ``exp(nll / (T − 1))``.

Compiled with the weights as arguments: each call splits the member (``nnx.split``) into
``(graphdef, state)`` (no copy: the state holds the member's own arrays) and calls a plain
``jax.jit`` function of ``(graphdef, state, ...)`` with ``graphdef`` static (:func:`split_jit`).
The weights are never constants of the program and no call copies them or writes them back
(``nnx.jit`` returns the module state from every call, so the member's buffers were replaced,
and the resident set grew, on every forward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int


def split_jit(fn, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
    """``fn(model, *args)`` compiled once per graph and shapes, the weights passed as arguments.

    Returns ``call(model, *args)``; ``call.jitted`` is the underlying ``jax.jit`` function of
    ``(graphdef, state, *args)``.  ``static_argnums`` / ``donate_argnums`` index ``args``
    (0 = the first argument after the model).  ``fn`` must not change the model's state.
    """
    shift = lambda idx: tuple(2 + i for i in idx)  # noqa: E731

    @functools.partial(jax.jit, static_argnums=(0,) + shift(static_argnums), donate_argnums=shift(donate_argnums))
    def jitted(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    @functools.wraps(fn)
    def call(model, *args):
        graphdef, state = nnx.split(model)
        return jitted(graphdef, state, *args)

    call.jitted = jitted
    return call


def _forward_fn(model, tokens, positions, kv_mask):
    b, t = tokens.shape
    cache = model.init_cache(b, t)
    logits, _ = model(tokens, positions, cache, jnp.zeros((), jnp.int32), kv_mask)
    return logits


_forward = split_jit(_forward_fn)


def full_logits(model, tokens: Int[ArrayLike, "B T"], pad_mask=None) -> Float[Array, "B T V"]:
    """Logits of a full (uncached) forward pass; ``pad_mask[b, t]`` False marks left padding."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if pad_mask is None:
        pad_mask = jnp.ones(tokens.shape, bool)
    pad_mask = jnp.asarray(pad_mask, bool)
    positions = jnp.maximum(jnp.cumsum(pad_mask, axis=1) - 1, 0).astype(jnp.int32)
    return _forward(model, tokens, positions, pad_mask)


def _chunk_nll_fn(model, cache, tokens, targets, valid, start, chunk):
    """Feed ``tokens`` (one chunk) at slot ``start``; NLL of ``targets`` where ``valid``."""
    kv_mask = (jnp.arange(cache.k.shape[2]) < start + chunk)[None, :]  # pads sit after every real token
    positions = (start + jnp.arange(chunk))[None, :].astype(jnp.int32)
    logits, cache = model(tokens[None], positions, cache, start, kv_mask)
    lp = jax.nn.log_softmax(logits[0], axis=-1)
    nll = -jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
    return jnp.where(valid, nll, 0.0), cache


_chunk_nll = split_jit(_chunk_nll_fn, static_argnums=(5,))  # no donation: callers may pass one zeros buffer for several caches


def token_nll(model, tokens, chunk: int = 256) -> np.ndarray:
    """``−log p(x_t | x_<t)`` for ``t = 1 … T−1`` (float64 numpy), the sequence fed in chunks."""
    ids = np.asarray(tokens, dtype=np.int32).ravel()
    n = ids.size
    if n < 2:
        raise ValueError(f"Expected at least 2 tokens to score, got {n}")
    n_chunks = -(-n // chunk)
    padded = np.zeros(n_chunks * chunk + 1, np.int32)
    padded[:n] = ids
    cache = model.init_cache(1, n_chunks * chunk)
    out = []
    for c in range(n_chunks):
        lo = c * chunk
        inp = jnp.asarray(padded[lo:lo + chunk])
        tgt = jnp.asarray(padded[lo + 1:lo + chunk + 1])
        valid = jnp.asarray(np.arange(lo + 1, lo + chunk + 1) < n)
        s, cache = _chunk_nll(model, cache, inp, tgt, valid, jnp.int32(lo), chunk)
        out.append(np.asarray(s, np.float64))
    return np.concatenate(out)[: n - 1]


def sequence_nll(model, tokens, chunk: int = 256) -> tuple[float, int]:
    """``(Σ −log p(x_t | x_<t), number of predicted tokens)`` for one token sequence."""
    nll = token_nll(model, tokens, chunk)
    return float(nll.sum()), int(nll.size)


def perplexity(model, tokens, chunk: int = 256) -> float:
    nll, count = sequence_nll(model, tokens, chunk)
    return float(np.exp(nll / count))
