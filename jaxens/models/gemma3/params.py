"""Parameter mapping of Gemma 3: transformers and GGUF tensor names, random init.

Internal layout (see :mod:`jaxens.models.stacking`): ``embed [V, d]`` (tied head), ``final_norm [d]``
and per-layer ``layers/<name> [L, ...]`` with Linear weights ``[in, out]``.  RMSNorm weights ``w``
are used as ``x̂ (1 + w)``, as in transformers.  Multimodal checkpoints
(``Gemma3ForConditionalGeneration``) keep only the language model.

GGUF (llama.cpp) names map to transformers names by :data:`GGUF_TOP` / :data:`GGUF_BLOCK`;
llama.cpp stores RMSNorm weights as ``1 + w``, so :func:`tensor_from_gguf` subtracts 1.
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
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "pre_mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", False),
    "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}

# GGUF tensor stem -> transformers stem (the ".weight" suffix is kept)
GGUF_BLOCK = {
    "attn_norm": "model.layers.{i}.input_layernorm",
    "attn_q": "model.layers.{i}.self_attn.q_proj",
    "attn_k": "model.layers.{i}.self_attn.k_proj",
    "attn_v": "model.layers.{i}.self_attn.v_proj",
    "attn_output": "model.layers.{i}.self_attn.o_proj",
    "attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "ffn_up": "model.layers.{i}.mlp.up_proj",
    "ffn_down": "model.layers.{i}.mlp.down_proj",
}
GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _strip_multimodal(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """Gemma3ForConditionalGeneration checkpoints: keep the language model, drop the vision tower."""
    if not any(k.startswith(("language_model.", "model.language_model.")) for k in tensors):
        return tensors
    out = {}
    for k, v in tensors.items():
        for pre, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if k.startswith(pre):
                out[new + k[len(pre):]] = v
    return out


def hf_names(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's tensors under the names of :data:`HF_TOP` / :data:`HF_LAYER` (the language
    model of a multimodal checkpoint)."""
    return _strip_multimodal(tensors)

def params_from_hf(config: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stack a transformers-named state dict into the internal layout (shapes checked)."""
    return gather_stacked(config.param_shapes(), HF_TOP, HF_LAYER, config.n_layers, hf_names(tensors))


def params_to_hf(config: Any, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The internal layout as a transformers-named state dict."""
    return scatter_stacked(params, HF_TOP, HF_LAYER, config.n_layers)


def tensor_from_gguf(arch: str, name: str, w: np.ndarray, hf_config: Mapping) -> np.ndarray:
    """A dequantised GGUF tensor ``name`` in transformers' convention (norm weights ``w − 1``)."""
    return w - 1.0 if name.endswith("norm.weight") else w


def init_params(config: Any, key: Array, std: float = 0.02) -> dict[str, Array]:
    """Random parameters ``s · z``, ``z ~ N(0, 1)``, ``s = 0.1`` for norms and ``std`` otherwise."""
    shapes = config.param_shapes()
    keys = jax.random.split(key, len(shapes))
    return {
        name: (0.1 if name.endswith("norm") else std) * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, sorted(shapes.items()))
    }
