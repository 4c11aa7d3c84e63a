"""A tiny random-weight transformer that follows the member contract (jaxens/models/base.py).

Used by the decode / sampling / ME tests so they run in seconds on a CPU.  ``reference_logits``
is an independent, cache-free forward pass (plain causal attention over the whole sequence)
used as the ground truth for the cached decode loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxens.models.base import KVCache


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 48
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 8
    max_position_embeddings: int = 256
    logit_scale: float = 3.0


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class ToyLM(nnx.Module):
    """Learned positions, GQA attention with a ``[L, B, S, K, H]`` cache, ReLU MLP, biased head."""

    def __init__(self, config: ToyConfig, *, seed: int = 0):
        self.config = config
        c = config
        ks = iter(jax.random.split(jax.random.key(seed), 10))

        def w(shape, scale):
            return nnx.Param(scale * jax.random.normal(next(ks), shape, jnp.float32))

        d, L, hq, hk = c.d_model, c.n_layers, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.embed = w((c.vocab_size, d), 1.0)
        self.pos = w((c.max_position_embeddings, d), 0.5)
        self.wq = w((L, d, hq), d**-0.5)
        self.wk = w((L, d, hk), d**-0.5)
        self.wv = w((L, d, hk), d**-0.5)
        self.wo = w((L, hq, d), hq**-0.5)
        self.w1 = w((L, d, 2 * d), d**-0.5)
        self.w2 = w((L, 2 * d, d), (2 * d) ** -0.5)
        self.head = w((c.vocab_size, d), c.logit_scale * d**-0.5)
        self.bias = w((c.vocab_size,), 0.5)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
        z = jnp.zeros(shape, dtype or jnp.float32)
        return KVCache(z, z)

    def unembedding(self):
        return self.head[...], self.bias[...]

    def _attend(self, q, k, v, mask):
        # q (B,T,Hq,H), k/v (B,S,K,H), mask (B,T,S)
        c = self.config
        B, T = q.shape[:2]
        g = c.n_heads // c.n_kv_heads
        q = q.reshape(B, T, c.n_kv_heads, g, c.head_dim)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(c.head_dim)
        s = jnp.where(mask[:, None, None], s, jnp.finfo(s.dtype).min)
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bkgts,bskh->btkgh", a, v)
        return o.reshape(B, T, c.n_heads * c.head_dim)

    def __call__(self, tokens, positions, cache, cache_index, kv_mask):
        c = self.config
        B, T = tokens.shape
        S = cache.k.shape[2]
        x = self.embed[...][tokens] + self.pos[...][positions]
        slots = jnp.arange(S)
        qpos = cache_index + jnp.arange(T)
        mask = (slots[None, None, :] <= qpos[None, :, None]) & kv_mask[:, None, :]
        ks, vs = [], []
        for l in range(c.n_layers):
            h = _rms(x)
            q = (h @ self.wq[l]).reshape(B, T, c.n_heads, c.head_dim)
            k = (h @ self.wk[l]).reshape(B, T, c.n_kv_heads, c.head_dim)
            v = (h @ self.wv[l]).reshape(B, T, c.n_kv_heads, c.head_dim)
            kc = jax.lax.dynamic_update_slice(cache.k[l], k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            vc = jax.lax.dynamic_update_slice(cache.v[l], v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            ks.append(kc)
            vs.append(vc)
            x = x + self._attend(q, kc, vc, mask) @ self.wo[l]
            x = x + jax.nn.relu(_rms(x) @ self.w1[l]) @ self.w2[l]
        logits = _rms(x) @ self.head[...].T + self.bias[...][None, None, :]
        return logits.astype(jnp.float32), KVCache(jnp.stack(ks), jnp.stack(vs))


def reference_logits(model: ToyLM, tokens) -> np.ndarray:
    """Cache-free forward of one unpadded sequence ``tokens`` (list/array of ids): ``(T, V)``.

    The sequence is right-padded to a power of two (causal attention makes the padding
    invisible to the real positions) so that one compile serves many lengths.
    """
    T = len(tokens)
    n = 64
    while n < T:
        n *= 2
    t = np.zeros((n,), np.int32)
    t[:T] = np.asarray(tokens)
    return np.asarray(_reference_jit(model, jnp.asarray(t)))[:T]


@nnx.jit
def _reference_jit(model, tokens):
    return _reference(model, tokens)


def _reference(model: ToyLM, tokens):
    c = model.config
    t = tokens[None]
    T = t.shape[1]
    x = model.embed[...][t] + model.pos[...][jnp.arange(T)][None]
    causal = jnp.tril(jnp.ones((T, T), bool))
    g = c.n_heads // c.n_kv_heads
    for l in range(c.n_layers):
        h = _rms(x)
        q = (h @ model.wq[l]).reshape(1, T, c.n_heads, c.head_dim)
        k = (h @ model.wk[l]).reshape(1, T, c.n_kv_heads, c.head_dim)
        v = (h @ model.wv[l]).reshape(1, T, c.n_kv_heads, c.head_dim)
        k = jnp.repeat(k, g, axis=2)
        v = jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(c.head_dim)
        s = jnp.where(causal[None, None], s, -jnp.inf)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(1, T, -1)
        x = x + o @ model.wo[l]
        x = x + jax.nn.relu(_rms(x) @ model.w1[l]) @ model.w2[l]
    return (_rms(x) @ model.head[...].T + model.bias[...][None, None, :])[0]


def reference_kv(model: ToyLM, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of an unpadded sequence from a fresh prefill: ``[L, T, K, H]`` each.

    Right-padded to 64 slots like :func:`reference_logits` (causal: invisible to real tokens).
    """
    T = len(tokens)
    n = 64
    while n < T:
        n *= 2
    t = np.zeros((n,), np.int32)
    t[:T] = np.asarray(tokens)
    k, v = _reference_kv_jit(model, jnp.asarray(t))
    return np.asarray(k)[:, :T], np.asarray(v)[:, :T]


@nnx.jit
def _reference_kv_jit(model, t):
    n = t.shape[0]
    _, cache = model(t[None], jnp.arange(n)[None], model.init_cache(1, n), jnp.int32(0), jnp.ones((1, n), bool))
    return cache.k[:, 0], cache.v[:, 0]
