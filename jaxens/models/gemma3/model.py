"""Gemma 3 text decoder (Gemma Team, 2025, "Gemma 3 Technical Report") as a Flax NNX member.

With ``n_w(x) = x / sqrt(mean(x²) + ε) · (1 + w)`` (one weight per use), each layer is

    a  = Attn( rope_ℓ(n_q(W_q n_1(x))), rope_ℓ(n_k(W_k n_1(x))), W_v n_1(x) )      (q/k norms per head)
    h  = x + n_2(W_o a)
    x' = h + n_4( W_down( gelu_tanh(W_gate n_3(h)) ⊙ W_up n_3(h) ) )

on the input ``x_0 = √d · E[token]``; logits are ``E n_f(x_L)`` (tied), softcapped as
``c · tanh(z / c)`` when ``final_logit_softcap = c`` is set.  Attention uses the scale
``query_pre_attn_scalar^{-1/2}`` and grouped-query heads.  Layers alternate between local
(sliding window ``w``: query ``t`` sees keys ``s`` with ``t − s < w``, RoPE base ``rope_local_base``)
and global ones (full causal, RoPE base ``rope_global_base``, optionally linearly scaled), by
``layer_types``.  Layers run as an unrolled loop over per-layer weights by default,
``scan_layers=True`` stacks them and runs one ``lax.scan``.  Matches ``transformers``' ``Gemma3ForCausalLM``;
the tensor-name mapping is in :mod:`jaxens.models.gemma3.params`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import jaxens.models.layers as ly
from jaxens.models.base import KVCache
from jaxens.models.gemma3.params import init_params

_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    layer_types: tuple[str, ...] | None = None  # default: every 6th layer global
    sliding_window: int = 512
    rope_global_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    rope_global_scale: float = 1.0  # linear position scaling of global layers (4B+: 8)
    query_pre_attn_scalar: float | None = None  # default head_dim
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    rms_eps: float = 1e-6
    max_len: int = 32768
    dtype: str = "float32"
    scan_layers: bool = False  # stacked weights + lax.scan instead of an unrolled layer loop

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "sliding_window", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected {name} > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Expected an even head_dim for rotary embeddings, got {self.head_dim}")
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", tuple(
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.n_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in _TYPES for t in self.layer_types):
            raise ValueError(f"Expected {self.n_layers} layer_types from {_TYPES}, got {self.layer_types}")
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        for name in ("final_logit_softcap", "attn_logit_softcap"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"Expected {name} > 0 or None, got {v}")
        ly.check_dtype(self.dtype)

    @classmethod
    def gemma3_270m(cls, **kw) -> "Gemma3Config":
        return cls(262144, 640, 18, 4, 1, 256, 2048, sliding_window=512, **kw)

    @classmethod
    def gemma3_1b(cls, **kw) -> "Gemma3Config":
        return cls(262144, 1152, 26, 4, 1, 256, 6912, sliding_window=512, **kw)

    @classmethod
    def tiny(cls, **kw) -> "Gemma3Config":
        base = dict(vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                    layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=5,
                    final_logit_softcap=30.0)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping, dtype: str = "float32") -> "Gemma3Config":
        """From a transformers config (``gemma3_text``, or ``gemma3`` with a ``text_config``)."""
        if cfg.get("model_type") == "gemma3":
            if "text_config" not in cfg:
                raise ValueError("gemma3 config without text_config")
            cfg = cfg["text_config"]
        n_layers = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types")
        if types is None:
            pat = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
            types = ["full_attention" if (i + 1) % pat == 0 else "sliding_attention" for i in range(n_layers)]
        rp = cfg.get("rope_parameters") or {}
        full, local = rp.get("full_attention", {}), rp.get("sliding_attention", {})
        scaling = cfg.get("rope_scaling") or full
        scale = 1.0
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            scale = float(scaling["factor"])
        elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"Unsupported rope scaling {scaling}")
        d, n = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=d,
            n_layers=n_layers,
            n_heads=n,
            n_kv_heads=int(cfg.get("num_key_value_heads", n)),
            head_dim=int(cfg.get("head_dim") or d // n),
            d_ff=int(cfg["intermediate_size"]),
            layer_types=tuple(types),
            sliding_window=int(cfg.get("sliding_window") or 4096),
            rope_global_base=float(full.get("rope_theta", cfg.get("rope_theta", 1e6))),
            rope_local_base=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))),
            rope_global_scale=scale,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or d // n),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_len=int(cfg.get("max_position_embeddings", 32768)),
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        full = {"rope_type": "default", "rope_theta": self.rope_global_base}
        if self.rope_global_scale != 1.0:
            full = {"rope_type": "linear", "factor": self.rope_global_scale, "rope_theta": self.rope_global_base}
        return {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base}},
            "rope_theta": self.rope_global_base,
            "rope_local_base_freq": self.rope_local_base,
            "query_pre_attn_scalar": (int(self.query_pre_attn_scalar)
                                      if float(self.query_pre_attn_scalar).is_integer() else self.query_pre_attn_scalar),
            "final_logit_softcapping": self.final_logit_softcap,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_len,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "torch_dtype": self.dtype,
        }

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        L, d, N, K, H, F = self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        return {
            "embed": (self.vocab_size, d),
            "final_norm": (d,),
            "layers/attn_norm": (L, d),
            "layers/wq": (L, d, N * H),
            "layers/wk": (L, d, K * H),
            "layers/wv": (L, d, K * H),
            "layers/wo": (L, N * H, d),
            "layers/q_norm": (L, H),
            "layers/k_norm": (L, H),
            "layers/post_attn_norm": (L, d),
            "layers/pre_mlp_norm": (L, d),
            "layers/post_mlp_norm": (L, d),
            "layers/w_gate": (L, d, F),
            "layers/w_up": (L, d, F),
            "layers/w_down": (L, F, d),
        }


class Gemma3(nnx.Module):
    """Gemma 3 member; see the module docstring for the equations."""

    def __init__(self, config: Gemma3Config, params: Mapping[str, ArrayLike] | None = None, *,
                 rngs: nnx.Rngs | None = None):
        if params is None:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            params = init_params(config, rngs.params())
        ly.check_params(config.param_shapes(), params)
        dt = ly.DTYPES[config.dtype]
        self.config = config
        self.embed = nnx.Param(jnp.asarray(params["embed"], dt))
        self.final_norm = nnx.Param(jnp.asarray(params["final_norm"], dt))
        self.layers = ly.store_layers({n.split("/", 1)[1]: v for n, v in params.items() if n.startswith("layers/")},
                                      config.scan_layers, dt)

    def params_numpy(self) -> dict[str, np.ndarray]:
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...]}
        out.update({f"layers/{k}": v for k, v in ly.stacked_layers(self.layers).items()})
        return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in out.items()}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
        dt = dtype if dtype is not None else ly.DTYPES[c.dtype]
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def unembedding(self) -> tuple[Float[Array, "V d"], None]:
        return self.embed[...], None

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache,
        cache_index: Int[Array, ""],
        kv_mask: Bool[Array, "B S"],
        *,
        logits="all",
    ) -> tuple[Float[Array, "B T2 V"] | None, KVCache]:
        """The member contract (:mod:`jaxens.models.base`); ``logits``: see ``layers.LOGITS_DOC``."""
        c = self.config
        ly.check_inputs(tokens, positions, cache, kv_mask, c.n_layers, c.n_kv_heads, c.head_dim)
        b, t = tokens.shape
        emb = self.embed[...]
        x = emb[tokens] * jnp.asarray(math.sqrt(c.d_model), emb.dtype)
        cos_g, sin_g = ly.rope_angles(positions, ly.rope_inv_freq(c.head_dim, c.rope_global_base,
                                                                  linear=c.rope_global_scale))
        cos_l, sin_l = ly.rope_angles(positions, ly.rope_inv_freq(c.head_dim, c.rope_local_base))
        mask_g = ly.attention_mask(t, cache_index, kv_mask)
        mask_l = ly.attention_mask(t, cache_index, kv_mask, window=c.sliding_window)
        is_global = [lt == "full_attention" for lt in c.layer_types]
        scale = c.query_pre_attn_scalar**-0.5
        norm = lambda x, w: ly.rms_norm(x, w, c.rms_eps, plus_one=True)  # noqa: E731

        def layer(x, p, kc, vc, li, g):
            cos, sin = ly.select(g, cos_g, cos_l), ly.select(g, sin_g, sin_l)
            mask = ly.select(g, mask_g, mask_l)
            h = norm(x, p["attn_norm"])
            q = norm((h @ p["wq"]).reshape(b, t, c.n_heads, c.head_dim), p["q_norm"])
            k = norm((h @ p["wk"]).reshape(b, t, c.n_kv_heads, c.head_dim), p["k_norm"])
            v = (h @ p["wv"]).reshape(b, t, c.n_kv_heads, c.head_dim)
            q, k = ly.apply_rope(q, cos, sin), ly.apply_rope(k, cos, sin)
            a, kc, vc = ly.cached_attention(q, k, v, kc, vc, cache_index, mask, scale, c.attn_logit_softcap,
                                            layer=li)
            x = x + norm(a.reshape(b, t, -1) @ p["wo"], p["post_attn_norm"])
            h = norm(x, p["pre_mlp_norm"])
            m = (ly.gelu_tanh(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
            x = x + norm(m, p["post_mlp_norm"])
            return x, kc, vc

        x, cache = ly.run_layers(layer, x, self.layers, cache, per_layer=is_global)
        x = ly.select_positions(x, logits)
        if x is None:
            return None, cache
        x = norm(x, self.final_norm[...])
        logits = jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)
        if c.final_logit_softcap is not None:
            logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits, cache
