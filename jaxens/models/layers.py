"""Pieces shared by the member families: norms, rotary embeddings, masked attention over a KV cache.

Attention for query ``t`` of row ``b`` (written at slot ``i + t``, ``i = cache_index``) over the
cache slots ``s``:

    a_{b,t} = softmax_s( q_{b,t} · k_{b,s} · scale  +  log 1[s <= i + t, kv_mask[b, s], i + t - s < w] ) · v_{b,s}

with grouped-query attention (``N`` query heads share ``K`` key/value heads, ``G = N / K``), the
window ``w`` only on sliding-window layers.  Masked scores are set to a large finite negative
number rather than ``-inf`` so that rows with no visible slot (pad queries) stay finite.

Rotary embeddings (Su et al., 2021, "RoFormer") in the half-split layout of Hugging Face
transformers: for ``x = [x_1, x_2]`` (halves of the head dimension) and angles
``θ_j = p · base^{-2j/H}``, ``rope(x) = [x_1 cos θ − x_2 sin θ, x_2 cos θ + x_1 sin θ]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxens.models.base import KVCache

NEG_INF = -1e30

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"Expected dtype in {sorted(DTYPES)}, got {dtype!r}")


def rms_norm(
    x: Float[Array, "... d"], w: Float[Array, " d"], eps: float, *, plus_one: bool = False
) -> Float[Array, "... d"]:
    """``x / sqrt(mean(x²) + eps) * w`` (``* (1 + w)`` for Gemma), computed in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    scale = 1.0 + w.astype(jnp.float32) if plus_one else w.astype(jnp.float32)
    return (y * jnp.expand_dims(scale, tuple(range(y.ndim - scale.ndim)))).astype(x.dtype)


def layer_norm(
    x: Float[Array, "... d"], w: Float[Array, " d"], b: Float[Array, " d"], eps: float
) -> Float[Array, "... d"]:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    lead = tuple(range(y.ndim - 1))  # explicit broadcast of the (d,) scale and shift
    return (y * jnp.expand_dims(w.astype(jnp.float32), lead) + jnp.expand_dims(b.astype(jnp.float32), lead)).astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(
    head_dim: int, base: float, scaling: tuple[float, float, float, int] | None = None, linear: float = 1.0
) -> Float[Array, " h"]:
    """Inverse frequencies ``base^{-2j/H}``; ``scaling`` = Llama 3's (factor, low, high, original_max)."""
    inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is not None:
        factor, low, high, old_len = scaling
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > low_wl, inv / factor, jnp.where(wavelen < high_wl, inv, mid))
    return inv / linear


def rope_angles(
    positions: Int[Array, "B T"], inv_freq: Float[Array, " h"]
) -> tuple[Float[Array, "B T h"], Float[Array, "B T h"]]:
    ang = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(
    x: Float[Array, "B T N H"], cos: Float[Array, "B T h"], sin: Float[Array, "B T h"]
) -> Float[Array, "B T N H"]:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].astype(jnp.float32), x[..., h:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attention_mask(
    num_new: int, cache_index: Int[Array, ""], kv_mask: Bool[Array, "B S"], window: int | Array | None = None
) -> Bool[Array, "B T S"]:
    """Visible slots per query: causal in slot order, real tokens only, and inside the window."""
    q = cache_index + jnp.arange(num_new)[:, None]
    s = jnp.arange(kv_mask.shape[1])[None, :]
    m = s <= q
    if window is not None:
        m = m & (q - s < window)
    return m[None] & kv_mask[:, None, :]


def check_params(shapes: dict[str, tuple[int, ...]], params) -> None:
    """``params`` has exactly the names of ``shapes``, each with its shape."""
    if set(params) != set(shapes):
        raise ValueError(f"Expected parameters {sorted(shapes)}, got {sorted(params)}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"Parameter {name}: expected shape {shape}, got {tuple(params[name].shape)}")


def check_inputs(tokens, positions, cache, kv_mask, n_layers: int, n_kv: int, head_dim: int) -> None:
    """Shape checks at trace time (static shapes only)."""
    if tokens.ndim != 2:
        raise ValueError(f"Expected tokens of shape [B, T], got {tokens.shape}")
    if positions.shape != tokens.shape:
        raise ValueError(f"Expected positions of shape {tokens.shape} (like tokens), got {positions.shape}")
    b, t = tokens.shape
    l_, cb, s, k, h = cache.k.shape
    if (l_, cb, k, h) != (n_layers, b, n_kv, head_dim) or cache.v.shape != cache.k.shape:
        raise ValueError(
            f"Expected a cache of shape [{n_layers}, {b}, S, {n_kv}, {head_dim}] (from model.init_cache({b}, S)), "
            f"got k {cache.k.shape}, v {cache.v.shape}"
        )
    if t > s:
        raise ValueError(f"{t} new tokens do not fit a cache of {s} slots: use init_cache(batch, max_len >= {t})")
    if kv_mask.shape != (b, s):
        raise ValueError(f"Expected kv_mask of shape [{b}, {s}] (batch, cache slots), got {kv_mask.shape}")


def cached_attention(
    q: Float[Array, "B T N H"],
    k_new: Float[Array, "B T K H"],
    v_new: Float[Array, "B T K H"],
    k_cache: Float[Array, "*L B S K H"],
    v_cache: Float[Array, "*L B S K H"],
    cache_index: Int[Array, ""],
    mask: Bool[Array, "B T S"],
    scale: float,
    softcap: float | None = None,
    layer: int | None = None,
) -> tuple[Float[Array, "B T N H"], Array, Array]:
    """Write the new keys/values at ``cache_index`` and attend over the whole cache (GQA).

    With ``layer=None`` the caches are one layer's ``[B, S, K, H]``; with an int ``layer`` they are
    the stacked ``[L, B, S, K, H]`` caches, updated in place at that layer (unrolled layers).
    """
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
    if layer is None:
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), idx)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), idx)
        k_l, v_l = k_cache, v_cache
    else:
        idx = (jnp.int32(layer),) + idx
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None].astype(k_cache.dtype), idx)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None].astype(v_cache.dtype), idx)
        k_l, v_l = k_cache[layer], v_cache[layer]
    return attend(q, k_l, v_l, mask, scale, softcap), k_cache, v_cache


def attend(
    q: Float[Array, "B T N H"],
    k_cache: Float[Array, "B S K H"],
    v_cache: Float[Array, "B S K H"],
    mask: Bool[Array, "B T S"],
    scale: float,
    softcap: float | None = None,
) -> Float[Array, "B T N H"]:
    """Masked grouped-query attention of ``q`` over every cache slot."""
    b, t, n, h = q.shape
    kh = k_cache.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_cache.astype(q.dtype))
    return out.reshape(b, t, n, h)


# --- layer storage and the layer loop shared by the families ------------------------------------
#
# ``scan_layers=False`` (default): one parameter dict per layer (``nnx.List``) and an unrolled Python
# loop over the layers, writing each layer's keys/values into the stacked cache in place; no layer's
# weights are sliced out of a stack, and the compiled program holds one copy of the layer per layer.
# ``scan_layers=True``: stacked ``[L, ...]`` weights and one ``lax.scan`` over them (one copy of the
# layer in the program).


def store_layers(stacked: dict, scan: bool, dtype):
    """Per-layer weights from ``{name: [L, ...]}``: stacked (scan) or one dict per layer (unrolled)."""
    if scan:
        return nnx.Dict({n: nnx.Param(jnp.asarray(v, dtype)) for n, v in stacked.items()})
    n_layers = len(next(iter(stacked.values())))
    return nnx.List([nnx.Dict({n: nnx.Param(jnp.asarray(v[i], dtype)) for n, v in stacked.items()})
                     for i in range(n_layers)])


def stacked_layers(layers) -> dict:
    """``{name: [L, ...]}`` of the per-layer weights, whichever layout they are stored in."""
    if isinstance(layers, nnx.List):
        return {n: jnp.stack([lp[n][...] for lp in layers]) for n in layers[0].keys()}
    return {n: v[...] for n, v in layers.items()}


def run_layers(layer, x, layers, cache, per_layer=None):
    """Run ``layer(x, p, k, v, i, extra) -> (x, k, v)`` over every layer.

    Unrolled (``layers`` an ``nnx.List``): ``i`` is the static layer index, ``k``/``v`` the stacked
    ``[L, B, S, K, H]`` caches and ``extra`` ``per_layer[i]`` (a Python value).  Scanned: ``i`` is
    ``None``, ``k``/``v`` one layer's ``[B, S, K, H]`` and ``extra`` the traced ``per_layer`` entry.
    """
    if isinstance(layers, nnx.List):
        k, v = cache.k, cache.v
        for i, lp in enumerate(layers):
            p = {n: w[...] for n, w in lp.items()}
            x, k, v = layer(x, p, k, v, i, None if per_layer is None else per_layer[i])
        return x, KVCache(k, v)
    p = {n: w[...] for n, w in layers.items()}
    extra = jnp.zeros((cache.k.shape[0],), bool) if per_layer is None else jnp.asarray(per_layer)

    def body(x, xs):
        p, kc, vc, e = xs
        x, kc, vc = layer(x, p, kc, vc, None, e)
        return x, (kc, vc)

    x, (k, v) = jax.lax.scan(body, x, (p, cache.k, cache.v, extra))
    return x, KVCache(k, v)


LOGITS_DOC = """``logits``: which positions get logits: ``"all"`` (``[B, T, V]``), ``"last"``
(``[B, 1, V]``, query ``T - 1``), ``"none"`` (``None``: only the cache update, e.g. a prefill or a
catch-up chunk), or an int scalar ``t`` (``[B, 1, V]`` at query ``t``; may be traced)."""


def select_positions(x: Float[Array, "B T d"], logits) -> Float[Array, "B T2 d"] | None:
    """The hidden states that get logits (see :data:`LOGITS_DOC`)."""
    if isinstance(logits, str):
        if logits == "all":
            return x
        if logits == "last":
            return x[:, -1:]
        if logits == "none":
            return None
        raise ValueError(f"Expected logits in ('all', 'last', 'none') or an int position, got {logits!r}")
    idx = jnp.asarray(logits)
    if idx.ndim != 0 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"Expected logits to be an int scalar position, got shape {idx.shape} {idx.dtype}")
    return jax.lax.dynamic_slice_in_dim(x, idx.astype(jnp.int32), 1, axis=1)


def select(flag, a, b):
    """``a if flag else b`` for a static flag, ``jnp.where`` for a traced one."""
    if isinstance(flag, (bool, np.bool_)):
        return a if flag else b
    return jnp.where(flag, a, b)
