"""GPT-2 (Radford et al., 2019) as a Flax NNX member.

With ``LN`` the LayerNorm ``(x − μ) / sqrt(σ² + ε) · γ + β`` and learned positions ``P``:

    x_0 = E[token] + P[position]
    [q, k, v] = LN_1(x) W_qkv + b_qkv                      (one fused projection, "c_attn")
    h  = x + Attn(q, k, v) W_o + b_o
    x' = h + gelu_tanh(LN_2(h) W_fc + b_fc) W_proj + b_proj

and logits ``E LN_f(x_L)`` (tied head).  Weights are stored ``[in, out]`` as in transformers'
``Conv1D``, so they load without transposition.  Matches ``transformers``' ``GPT2LMHeadModel``;
the tensor-name mapping is in :mod:`jaxens.models.gpt2.params`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import jaxens.models.layers as ly
from jaxens.models.base import KVCache
from jaxens.models.gpt2.params import init_params


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None  # default 4 d
    max_len: int = 1024
    ln_eps: float = 1e-5
    dtype: str = "float32"
    scan_layers: bool = False  # stacked weights + lax.scan instead of an unrolled layer loop

    def __post_init__(self):
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected {name} > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not self.ln_eps > 0:
            raise ValueError(f"Expected ln_eps > 0, got {self.ln_eps}")
        ly.check_dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def gpt2_small(cls, **kw) -> "GPT2Config":
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "GPT2Config":
        base = dict(vocab_size=103, d_model=64, n_layers=2, n_heads=4, max_len=128)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping, dtype: str = "float32") -> "GPT2Config":
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"GPT2Config.from_hf: model_type {cfg.get('model_type')!r} is not gpt2")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if cfg.get(flag):
                raise ValueError(f"GPT-2 option {flag}=True is not supported")
        if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {cfg['activation_function']!r} is not supported (gelu_new)")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg.get("n_embd", 768)),
            n_layers=int(cfg.get("n_layer", 12)),
            n_heads=int(cfg.get("n_head", 12)),
            d_ff=cfg.get("n_inner"),
            max_len=int(cfg.get("n_positions", 1024)),
            ln_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_embd": self.d_model,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.d_ff,
            "n_positions": self.max_len,
            "layer_norm_epsilon": self.ln_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
            "torch_dtype": self.dtype,
        }

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        L, d, F = self.n_layers, self.d_model, self.d_ff
        return {
            "embed": (self.vocab_size, d),
            "pos_embed": (self.max_len, d),
            "ln_f_w": (d,),
            "ln_f_b": (d,),
            "layers/ln1_w": (L, d),
            "layers/ln1_b": (L, d),
            "layers/w_qkv": (L, d, 3 * d),
            "layers/b_qkv": (L, 3 * d),
            "layers/w_o": (L, d, d),
            "layers/b_o": (L, d),
            "layers/ln2_w": (L, d),
            "layers/ln2_b": (L, d),
            "layers/w_fc": (L, d, F),
            "layers/b_fc": (L, F),
            "layers/w_proj": (L, F, d),
            "layers/b_proj": (L, d),
        }


class GPT2(nnx.Module):
    """GPT-2 member; see the module docstring for the equations."""

    def __init__(self, config: GPT2Config, params: Mapping[str, ArrayLike] | None = None, *,
                 rngs: nnx.Rngs | None = None):
        if params is None:
            rngs = rngs if rngs is not None else nnx.Rngs(0)
            params = init_params(config, rngs.params())
        ly.check_params(config.param_shapes(), params)
        dt = ly.DTYPES[config.dtype]
        self.config = config
        self.top = nnx.Dict({n: nnx.Param(jnp.asarray(v, dt)) for n, v in params.items() if "/" not in n})
        self.layers = ly.store_layers({n.split("/", 1)[1]: v for n, v in params.items() if n.startswith("layers/")},
                                      config.scan_layers, dt)

    def params_numpy(self) -> dict[str, np.ndarray]:
        out = {k: v[...] for k, v in self.top.items()}
        out.update({f"layers/{k}": v for k, v in ly.stacked_layers(self.layers).items()})
        return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in out.items()}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.n_layers, batch, max_len, c.n_heads, c.head_dim)
        dt = dtype if dtype is not None else ly.DTYPES[c.dtype]
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def unembedding(self) -> tuple[Float[Array, "V d"], None]:
        return self.top["embed"][...], None

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
        ly.check_inputs(tokens, positions, cache, kv_mask, c.n_layers, c.n_heads, c.head_dim)
        b, t = tokens.shape
        top = {k: v[...] for k, v in self.top.items()}
        x = top["embed"][tokens] + top["pos_embed"][jnp.clip(positions, 0, c.max_len - 1)]
        mask = ly.attention_mask(t, cache_index, kv_mask)
        scale = c.head_dim**-0.5

        def layer(x, p, kc, vc, li, _):
            h = ly.layer_norm(x, p["ln1_w"], p["ln1_b"], c.ln_eps)
            q, k, v = jnp.split(h @ p["w_qkv"] + p["b_qkv"][None, None, :], 3, axis=-1)
            shp = (b, t, c.n_heads, c.head_dim)
            a, kc, vc = ly.cached_attention(q.reshape(shp), k.reshape(shp), v.reshape(shp), kc, vc,
                                            cache_index, mask, scale, layer=li)
            x = x + a.reshape(b, t, -1) @ p["w_o"] + p["b_o"][None, None, :]
            h = ly.layer_norm(x, p["ln2_w"], p["ln2_b"], c.ln_eps)
            x = x + ly.gelu_tanh(h @ p["w_fc"] + p["b_fc"][None, None, :]) @ p["w_proj"] + p["b_proj"][None, None, :]
            return x, kc, vc

        x, cache = ly.run_layers(layer, x, self.layers, cache)
        x = ly.select_positions(x, logits)
        if x is None:
            return None, cache
        x = ly.layer_norm(x, top["ln_f_w"], top["ln_f_b"], c.ln_eps)
        return jnp.einsum("btd,vd->btv", x, top["embed"], preferred_element_type=jnp.float32), cache
