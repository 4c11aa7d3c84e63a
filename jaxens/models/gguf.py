"""Read GGUF checkpoints (llama.cpp's format) into float weights and a transformers-style config.

``load_gguf(path)`` dequantises every tensor with the ``gguf`` package (Q4_0/1, Q5_*, Q8_0, K-quants,
F16, ...), renames it to transformers' naming, and builds the member through the same path as a
Hugging Face directory (:func:`jaxens.models.loading.model_from_hf_tensors`).  Two of llama.cpp's
conversions are undone on the way:

* ``llama`` architecture: ``convert_hf_to_gguf.py`` permutes the rows of ``W_q`` and ``W_k`` from
  the half-split rotary layout to the interleaved one, ``w.reshape(n, 2, h/2, d).swapaxes(1, 2)``
  (``n`` heads of size ``h``); the inverse is ``w.reshape(n, h/2, 2, d).swapaxes(1, 2)``
  (as in transformers' ``LlamaTensorProcessor``).
* ``gemma3``: llama.cpp stores RMSNorm weights as ``1 + w``; transformers (and
  :mod:`jaxens.models.gemma3`) use ``w`` with the norm ``x̂ (1 + w)``, so 1 is subtracted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3", "gpt2")


def _open(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        from jaxens.models.loading import pickle_refusal

        raise pickle_refusal(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct/numpy errors, IndexError... on bad files
        raise ValueError(f"file {path} is truncated or not a GGUF: {type(e).__name__}: {e}") from e


def _value(field) -> Any:
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return np.concatenate([np.asarray(field.parts[i]).ravel() for i in field.data]) if field.data else np.zeros(0)
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return np.asarray(field.parts[field.data[0]]).ravel()[0].item()


def read_metadata(path: str | os.PathLike, *, arrays: bool = False) -> dict[str, Any]:
    """The GGUF key/value metadata (long arrays such as the vocabulary only with ``arrays=True``)."""
    reader = _open(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if not arrays and len(field.data) > 64:
            continue
        out[key] = _value(field)
    return out


def _hf_config(meta: dict[str, Any], tensor_names: set[str], n_vocab: int) -> dict:
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")

    def g(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    vocab = int(meta.get(f"{arch}.vocab_size", n_vocab))
    if arch == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_embd": int(g("embedding_length")),
            "n_layer": int(g("block_count")),
            "n_head": int(g("attention.head_count")),
            "n_positions": int(g("context_length")),
            "n_inner": int(g("feed_forward_length", 4 * int(g("embedding_length")))),
            "layer_norm_epsilon": float(g("attention.layer_norm_epsilon", 1e-5)),
        }
    d, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    kv = g("attention.head_count_kv", n_heads)
    if isinstance(kv, np.ndarray) or isinstance(kv, list):
        raise ValueError("GGUF with per-layer head counts is not supported")
    cfg = {
        "vocab_size": vocab,
        "hidden_size": d,
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(kv),
        "intermediate_size": int(g("feed_forward_length")),
        "max_position_embeddings": int(g("context_length", 8192)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "head_dim": int(g("attention.key_length", d // n_heads)),
    }
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF with a rope_freqs tensor (Llama 3.1+ rope scaling) is not supported yet; "
                         "load the Hugging Face safetensors directory instead")
    if arch in ("llama", "qwen2"):
        cfg["model_type"] = arch
        return cfg
    # gemma3: what llama.cpp hard-codes (src/llama-model.cpp, LLM_ARCH_GEMMA3)
    n_layers = cfg["num_hidden_layers"]
    window = int(g("attention.sliding_window", 4096))
    pattern = 6
    cfg.update({
        "model_type": "gemma3_text",
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": (d // n_heads) if n_layers == 62 else cfg["head_dim"],
        "final_logit_softcapping": meta.get("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get("gemma3.attn_logit_softcapping"),
        "tie_word_embeddings": True,
    })
    if meta.get("gemma3.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["gemma3.rope.scaling.factor"])}
    return cfg


_COMMON = {
    "attn_norm": "model.layers.{i}.input_layernorm",
    "attn_q": "model.layers.{i}.self_attn.q_proj",
    "attn_k": "model.layers.{i}.self_attn.k_proj",
    "attn_v": "model.layers.{i}.self_attn.v_proj",
    "attn_output": "model.layers.{i}.self_attn.o_proj",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "ffn_up": "model.layers.{i}.mlp.up_proj",
    "ffn_down": "model.layers.{i}.mlp.down_proj",
}
_BLOCK_NAMES = {
    "llama": {**_COMMON, "ffn_norm": "model.layers.{i}.post_attention_layernorm"},
    "qwen2": {**_COMMON, "ffn_norm": "model.layers.{i}.post_attention_layernorm"},
    "gemma3": {
        **_COMMON,
        "attn_q_norm": "model.layers.{i}.self_attn.q_norm",
        "attn_k_norm": "model.layers.{i}.self_attn.k_norm",
        "post_attention_norm": "model.layers.{i}.post_attention_layernorm",
        "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
        "post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    },
    "gpt2": {
        "attn_norm": "transformer.h.{i}.ln_1",
        "attn_qkv": "transformer.h.{i}.attn.c_attn",
        "attn_output": "transformer.h.{i}.attn.c_proj",
        "ffn_norm": "transformer.h.{i}.ln_2",
        "ffn_up": "transformer.h.{i}.mlp.c_fc",
        "ffn_down": "transformer.h.{i}.mlp.c_proj",
    },
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_TOP_GPT2 = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
             "output": "lm_head"}


def _hf_name(arch: str, name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        tmpl = _BLOCK_NAMES[arch].get(parts[2])
        return None if tmpl is None else tmpl.format(i=int(parts[1])) + "." + suffix
    top = (_TOP_GPT2 if arch == "gpt2" else _TOP_NAMES).get(stem)
    return None if top is None else top + "." + suffix


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    h2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, h2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(path: str | os.PathLike, *, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Dequantise a GGUF file into ``(transformers config dict, transformers-named float32 tensors)``."""
    path = Path(path)
    reader = _open(path)
    try:
        meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.") and len(f.data) <= 64}
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
        arch = meta.get("general.architecture")
        if arch is None:
            raise ValueError("no general.architecture key")
    except (KeyError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"file {path} is truncated or not a GGUF: {type(e).__name__}: {e}") from e
    try:
        return _convert(path, reader, meta, n_vocab, arch, progress)
    except (ValueError, KeyError, IndexError, TypeError, StopIteration) as e:
        if str(path) in str(e):
            raise
        raise ValueError(
            f"file {path}: {type(e).__name__}: {e} (the file is truncated, corrupt, or of an "
            "architecture jaxens does not support)"
        ) from e


def _convert(path, reader, meta, n_vocab, arch, progress):
    import gguf
    from tqdm.auto import tqdm

    names = {t.name for t in reader.tensors}
    cfg = _hf_config(meta, names, n_vocab)
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    tensors: dict[str, np.ndarray] = {}
    it = tqdm(reader.tensors, desc=f"dequantising {path.name}", disable=not progress, leave=False)
    for t in it:
        hf = _hf_name(arch, t.name)
        if hf is None:
            raise ValueError(f"GGUF tensor {t.name!r} ({arch}) has no counterpart in jaxens")
        try:
            w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"file {path}: cannot dequantise tensor {t.name} ({t.tensor_type.name}): {e}") from e
        expected = tuple(int(s) for s in reversed(t.shape.tolist()))
        if w.size != int(np.prod(expected)):
            raise ValueError(f"file {path} is truncated or corrupt: tensor {t.name} has {w.size} values, "
                             f"expected shape {expected}")
        w = w.reshape(expected)
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif arch == "llama" and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        elif arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0
        elif arch == "gpt2" and any(s in t.name for s in ("attn_qkv.weight", "attn_output.weight",
                                                            "ffn_up.weight", "ffn_down.weight")):
            w = np.ascontiguousarray(w.T)  # HF GPT-2 uses Conv1D: [in, out]
        tensors[hf] = w
    if arch == "gpt2" and cfg.get("vocab_size") and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")  # GPT-2 ties the head in transformers
    return cfg, tensors


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, progress: bool = True):
    """Load a member from a GGUF file (dequantised to float32, then cast to ``dtype``)."""
    from jaxens.models.loading import model_from_hf_tensors

    cfg, tensors = gguf_to_hf(path, progress=progress)
    return model_from_hf_tensors(cfg, tensors, dtype=dtype)
