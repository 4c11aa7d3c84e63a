"""Llama-style decoder (Llama 2/3, SmolLM, SmolLM2, Mistral, Qwen2) as a Flax NNX member.

Each of the ``L`` layers (pre-norm residual, Touvron et al., 2023, "LLaMA"):

    h = x + W_o · Attn( rope(W_q n(x) + b_q), rope(W_k n(x) + b_k), W_v n(x) + b_v )
    x' = h + W_down ( silu(W_gate n(h)) ⊙ W_up n(h) )

with ``n`` the RMSNorm ``n(x) = x / sqrt(mean(x²) + ε) · w`` (one weight per use), grouped-query
attention (``n_heads`` query heads over ``n_kv_heads`` key/value heads, scale ``head_dim^-1/2``),
rotary embeddings with base ``rope_theta`` (and Llama 3's frequency scaling when given),
q/k/v biases for Qwen2, and logits ``E n(x_L)`` with the embedding ``E`` (tied) or a separate head.

By default each layer keeps its own weights and the layers run as an unrolled loop;
``scan_layers=True`` stacks them along a leading ``L`` axis and runs one ``lax.scan``.  Matches
``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``.  The tensor-name mapping is in
:mod:`jaxens.models.llama.params`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import jaxens.models.layers as ly
from jaxens.models.base import KVCache
from jaxens.models.llama.params import init_params


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, float, float, int] | None = None  # Llama 3: factor, low, high, original max
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_len: int = 8192
    model_type: str = "llama"
    dtype: str = "float32"
    scan_layers: bool = False  # stacked weights + lax.scan instead of an unrolled layer loop

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected {name} > 0, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"Expected an even head_dim for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if not (self.rope_theta > 0 and self.rms_eps > 0):
            raise ValueError(f"Expected rope_theta > 0 and rms_eps > 0, got {self.rope_theta}, {self.rms_eps}")
        ly.check_dtype(self.dtype)
        if self.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"Expected model_type in ('llama', 'mistral', 'qwen2'), got {self.model_type!r}")
        if self.qkv_bias != (self.model_type == "qwen2"):
            raise ValueError("q/k/v biases go with model_type='qwen2' (as in transformers), got "
                             f"qkv_bias={self.qkv_bias}, model_type={self.model_type!r}")

    # --- named constructors ---------------------------------------------------------------
    @classmethod
    def smollm2_135m(cls, **kw) -> "LlamaConfig":
        return cls(49152, 576, 30, 9, 3, 1536, rope_theta=100000.0, rms_eps=1e-5, **kw)

    @classmethod
    def smollm2_360m(cls, **kw) -> "LlamaConfig":
        return cls(49152, 960, 32, 15, 5, 2560, rope_theta=100000.0, rms_eps=1e-5, **kw)

    @classmethod
    def qwen2_5_0_5b(cls, **kw) -> "LlamaConfig":
        return cls(151936, 896, 24, 14, 2, 4864, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True,
                   max_len=32768, model_type="qwen2", **kw)

    @classmethod
    def llama3_2_1b(cls, **kw) -> "LlamaConfig":
        return cls(128256, 2048, 16, 32, 8, 8192, head_dim=64, rope_theta=500000.0, rms_eps=1e-5,
                   rope_scaling=(32.0, 1.0, 4.0, 8192), max_len=131072, **kw)

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """A small random-weight configuration for tests."""
        base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, rope_theta=10000.0)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping, dtype: str = "float32") -> "LlamaConfig":
        """From a transformers ``config.json`` (model_type llama, mistral, qwen2)."""
        mt = cfg.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"LlamaConfig.from_hf: unsupported model_type {mt!r} (llama, mistral, qwen2)")
        rope = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        rtype = rope.get("rope_type", rope.get("type"))
        if rtype == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        elif rtype not in (None, "default"):
            raise ValueError(f"Unsupported rope scaling {rtype!r} (supported: default, llama3)")
        if mt != "qwen2" and cfg.get("attention_bias", False):
            raise ValueError("attention_bias=True (biases on q/k/v/o) is not supported for llama members")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", mt == "mistral"):
            raise ValueError("Sliding-window attention is not supported for llama-style members")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            d_ff=int(cfg["intermediate_size"]),
            head_dim=cfg.get("head_dim"),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2",
            max_len=int(cfg.get("max_position_embeddings", 8192)),
            model_type=mt,
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        cfg = {
            "model_type": self.model_type,
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.d_ff,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_len,
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
        }
        if self.rope_scaling is not None:
            f, lo, hi, old = self.rope_scaling
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                   "high_freq_factor": hi, "original_max_position_embeddings": old}
        return cfg

    # --- parameter layout -----------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        L, d, N, K, H, F = self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        s = {
            "embed": (self.vocab_size, d),
            "final_norm": (d,),
            "layers/attn_norm": (L, d),
            "layers/wq": (L, d, N * H),
            "layers/wk": (L, d, K * H),
            "layers/wv": (L, d, K * H),
            "layers/wo": (L, N * H, d),
            "layers/mlp_norm": (L, d),
            "layers/w_gate": (L, d, F),
            "layers/w_up": (L, d, F),
            "layers/w_down": (L, F, d),
        }
        if self.qkv_bias:
            s.update({"layers/bq": (L, N * H), "layers/bk": (L, K * H), "layers/bv": (L, K * H)})
        if not self.tie_embeddings:
            s["lm_head"] = (self.vocab_size, d)
        return s


class Llama(nnx.Module):
    """Llama-style member; see the module docstring for the equations."""

    def __init__(self, config: LlamaConfig, params: Mapping[str, ArrayLike] | None = None, *, rngs: nnx.Rngs | None = None):
        if params is None:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            params = init_params(config, rngs.params())
        ly.check_params(config.param_shapes(), params)
        dt = ly.DTYPES[config.dtype]
        self.config = config
        self.embed = nnx.Param(jnp.asarray(params["embed"], dt))
        self.final_norm = nnx.Param(jnp.asarray(params["final_norm"], dt))
        self.lm_head = nnx.Param(jnp.asarray(params["lm_head"], dt)) if "lm_head" in params else None
        self.layers = ly.store_layers({n.split("/", 1)[1]: v for n, v in params.items() if n.startswith("layers/")},
                                      config.scan_layers, dt)

    def params_numpy(self) -> dict[str, np.ndarray]:
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...]}
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head[...]
        out.update({f"layers/{k}": v for k, v in ly.stacked_layers(self.layers).items()})
        return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in out.items()}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
        dt = dtype if dtype is not None else ly.DTYPES[c.dtype]
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def unembedding(self) -> tuple[Float[Array, "V d"], None]:
        w = self.embed[...] if self.lm_head is None else self.lm_head[...]
        return w, None

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
        x = self.embed[...][tokens]
        cos, sin = ly.rope_angles(positions, ly.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
        mask = ly.attention_mask(t, cache_index, kv_mask)
        scale = c.head_dim**-0.5

        def layer(x, p, kc, vc, li, _):
            h = ly.rms_norm(x, p["attn_norm"], c.rms_eps)
            q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
            if c.qkv_bias:
                q, k, v = q + p["bq"][None, None, :], k + p["bk"][None, None, :], v + p["bv"][None, None, :]
            q = ly.apply_rope(q.reshape(b, t, c.n_heads, c.head_dim), cos, sin)
            k = ly.apply_rope(k.reshape(b, t, c.n_kv_heads, c.head_dim), cos, sin)
            v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
            a, kc, vc = ly.cached_attention(q, k, v, kc, vc, cache_index, mask, scale, layer=li)
            x = x + a.reshape(b, t, -1) @ p["wo"]
            h = ly.rms_norm(x, p["mlp_norm"], c.rms_eps)
            x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
            return x, kc, vc

        x, cache = ly.run_layers(layer, x, self.layers, cache)
        x = ly.select_positions(x, logits)
        if x is None:
            return None, cache
        x = ly.rms_norm(x, self.final_norm[...], c.rms_eps)
        w, _ = self.unembedding()
        return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32), cache
