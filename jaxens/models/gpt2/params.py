"""Parameter mapping of GPT-2: transformers and GGUF tensor names, random init.

Internal layout (see :mod:`jaxens.models.stacking`): ``embed [V, d]`` (tied head), ``pos_embed
[max_len, d]``, ``ln_f_w``/``ln_f_b [d]`` and per-layer ``layers/<name> [L, ...]``.  transformers'
GPT-2 uses ``Conv1D`` layers whose weights are already ``[in, out]``, so nothing is transposed;
the original OpenAI checkpoints name the tensors without the ``transformer.`` prefix.

GGUF (llama.cpp) names map to transformers names by :data:`GGUF_TOP` / :data:`GGUF_BLOCK`; GGUF
stores the four projection matrices ``[out, in]``, so :func:`tensor_from_gguf` transposes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from typing import Any

import numpy as np
from jaxtyping import Array

from jaxens.models.stacking import gather_stacked, scatter_stacked

_P = "transformer.h.{i}."
# internal per-layer name -> (transformers template, transpose)
HF_LAYER = {
    "ln1_w": (_P + "ln_1.weight", False),
    "ln1_b": (_P + "ln_1.bias", False),
    "w_qkv": (_P + "attn.c_attn.weight", False),
    "b_qkv": (_P + "attn.c_attn.bias", False),
    "w_o": (_P + "attn.c_proj.weight", False),
    "b_o": (_P + "attn.c_proj.bias", False),
    "ln2_w": (_P + "ln_2.weight", False),
    "ln2_b": (_P + "ln_2.bias", False),
    "w_fc": (_P + "mlp.c_fc.weight", False),
    "b_fc": (_P + "mlp.c_fc.bias", False),
    "w_proj": (_P + "mlp.c_proj.weight", False),
    "b_proj": (_P + "mlp.c_proj.bias", False),
}
HF_TOP = {"embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
          "ln_f_w": "transformer.ln_f.weight", "ln_f_b": "transformer.ln_f.bias", "lm_head": "lm_head.weight"}

# GGUF tensor stem -> transformers stem (the ".weight" / ".bias" suffix is kept)
GGUF_BLOCK = {
    "attn_norm": "transformer.h.{i}.ln_1",
    "attn_qkv": "transformer.h.{i}.attn.c_attn",
    "attn_output": "transformer.h.{i}.attn.c_proj",
    "ffn_norm": "transformer.h.{i}.ln_2",
    "ffn_up": "transformer.h.{i}.mlp.c_fc",
    "ffn_down": "transformer.h.{i}.mlp.c_proj",
}
GGUF_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
            "output": "lm_head"}
_GGUF_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def hf_names(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's tensors under the names of :data:`HF_TOP` / :data:`HF_LAYER` (the original
    OpenAI checkpoints lack the ``transformer.`` prefix)."""
    if "wte.weight" in tensors:
        return {("transformer." + k if not k.startswith("lm_head.") else k): v for k, v in tensors.items()}
    return tensors

def params_from_hf(config: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stack a transformers-named state dict into the internal layout (shapes checked)."""
    return gather_stacked(config.param_shapes(), HF_TOP, HF_LAYER, config.n_layers, hf_names(tensors))


def params_to_hf(config: Any, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The internal layout as a transformers-named state dict."""
    return scatter_stacked(params, HF_TOP, HF_LAYER, config.n_layers)


def tensor_from_gguf(arch: str, name: str, w: np.ndarray, hf_config: Mapping) -> np.ndarray:
    """A dequantised GGUF tensor ``name`` in transformers' ``Conv1D`` convention ``[in, out]``."""
    if any(s in name for s in _GGUF_TRANSPOSED):
        return np.ascontiguousarray(w.T)
    return w


def init_params(config: Any, key: Array, std: float = 0.02) -> dict[str, Array]:
    """Random parameters, ``z ~ N(0, 1)``: LayerNorm gains ``1 + 0.1 z``, biases ``0.1 z``, weights ``std · z``."""
    shapes = config.param_shapes()
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items())):
        z = jax.random.normal(k, shape, jnp.float32)
        out[name] = 1.0 + 0.1 * z if name.endswith("_w") and "ln" in name else (0.1 if "_b" in name else std) * z
    return out
