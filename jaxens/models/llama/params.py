"""Parameter mapping of the Llama-style family: transformers and GGUF tensor names, random init.

Internal layout (see :mod:`jaxens.models.stacking`): ``embed [V, d]``, ``final_norm [d]``, optional
``lm_head [V, d]`` and per-layer ``layers/<name> [L, ...]`` with Linear weights ``[in, out]``.

GGUF (llama.cpp) names map to transformers names by :data:`GGUF_TOP` / :data:`GGUF_BLOCK`
(``blk.{i}.attn_q.weight -> model.layers.{i}.self_attn.q_proj.weight``).  For the ``llama``
architecture ``convert_hf_to_gguf.py`` permutes the rows of ``W_q`` and ``W_k`` from the half-split
rotary layout to the interleaved one, ``w.reshape(n, 2, h/2, d).swapaxes(1, 2)`` (``n`` heads of
size ``h``); :func:`tensor_from_gguf` applies the inverse ``w.reshape(n, h/2, 2, d).swapaxes(1, 2)``
(as transformers' ``LlamaTensorProcessor`` does).  ``qwen2`` GGUFs are not permuted.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from typing import Any

import numpy as np
from jaxtyping import Array

from jaxens.models.stacking import gather_stacked, scatter_stacked

# internal per-layer name -> (transformers template, transpose the [out, in] Linear weight)
HF_LAYER = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}

# GGUF tensor stem -> transformers stem (the ".weight" / ".bias" suffix is kept)
GGUF_BLOCK = {
    "attn_norm": "model.layers.{i}.input_layernorm",
    "attn_q": "model.layers.{i}.self_attn.q_proj",
    "attn_k": "model.layers.{i}.self_attn.k_proj",
    "attn_v": "model.layers.{i}.self_attn.v_proj",
    "attn_output": "model.layers.{i}.self_attn.o_proj",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "ffn_up": "model.layers.{i}.mlp.up_proj",
    "ffn_down": "model.layers.{i}.mlp.down_proj",
}
GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_names(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's tensors under the names of :data:`HF_TOP` / :data:`HF_LAYER` (Llama: as given)."""
    return tensors

def params_from_hf(config: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stack a transformers-named state dict into the internal layout (shapes checked)."""
    return gather_stacked(config.param_shapes(), HF_TOP, HF_LAYER, config.n_layers, tensors)


def params_to_hf(config: Any, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The internal layout as a transformers-named state dict."""
    return scatter_stacked(params, HF_TOP, HF_LAYER, config.n_layers)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    h2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, h2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_from_gguf(arch: str, name: str, w: np.ndarray, hf_config: Mapping) -> np.ndarray:
    """A dequantised GGUF tensor ``name`` in transformers' convention (``W_q``/``W_k`` un-permuted)."""
    if arch == "llama" and name.endswith("attn_q.weight"):
        return _unpermute(w, hf_config["num_attention_heads"])
    if arch == "llama" and name.endswith("attn_k.weight"):
        return _unpermute(w, hf_config["num_key_value_heads"])
    return w


def init_params(config: Any, key: Array, std: float = 0.02) -> dict[str, Array]:
    """Random parameters: norms ``1 + 0.1 z``, every other tensor ``std · z``, ``z ~ N(0, 1)``."""
    shapes = config.param_shapes()
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items())):
        if name.endswith("norm"):
            out[name] = 1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        else:
            out[name] = std * jax.random.normal(k, shape, jnp.float32)
    return out
