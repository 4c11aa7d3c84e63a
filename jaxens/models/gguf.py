"""Read GGUF checkpoints (llama.cpp's format) into float weights and a transformers-style config.

``load_gguf(path)`` dequantises every tensor with the ``gguf`` package (Q4_0/1, Q5_*, Q8_0, K-quants,
F16, ...), renames it to transformers' naming with the family's tables (``GGUF_BLOCK`` /
``GGUF_TOP`` in ``jaxens.models.<family>.params``), undoes llama.cpp's layout conversions with the
family's ``tensor_from_gguf`` (Llama's rotary permutation of ``W_q``/``W_k``, Gemma 3's ``1 + w``
norm weights, GPT-2's transposed projections), and builds the member through the same path as a
Hugging Face directory (:func:`jaxens.models.loading.model_from_hf_tensors`).  The config comes
from the GGUF metadata (``<arch>.embedding_length``, ``<arch>.block_count``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

import jaxens.models.gemma3.params as gemma3_params
import jaxens.models.gpt2.params as gpt2_params
import jaxens.models.llama.params as llama_params
from jaxens.models.loading import PICKLE_SUFFIXES, model_from_hf_tensors, pickle_refusal

# GGUF ``general.architecture`` -> the family's parameter mapping
_PARAMS = {"llama": llama_params, "qwen2": llama_params, "gemma3": gemma3_params, "gpt2": gpt2_params}
SUPPORTED_ARCHS = tuple(_PARAMS)


def _open(path: str | os.PathLike):
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct/numpy errors, IndexError... on bad files
        raise ValueError(f"file {path} is truncated or not a GGUF: {type(e).__name__}: {e}") from e


def _value(field) -> Any:
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


def _hf_name(arch: str, name: str) -> str | None:
    """The transformers name of GGUF tensor ``name`` (``None`` when the family has none)."""
    fam = _PARAMS[arch]
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        tmpl = fam.GGUF_BLOCK.get(parts[2])
        return None if tmpl is None else tmpl.format(i=int(parts[1])) + "." + suffix
    top = fam.GGUF_TOP.get(stem)
    return None if top is None else top + "." + suffix


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
        tensors[hf] = _PARAMS[arch].tensor_from_gguf(arch, t.name, w.reshape(expected), cfg)
    if arch == "gpt2" and cfg.get("vocab_size") and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")  # GPT-2 ties the head in transformers
    return cfg, tensors


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, progress: bool = True):
    """Load a member from a GGUF file (dequantised to float32, then cast to ``dtype``)."""
    cfg, tensors = gguf_to_hf(path, progress=progress)
    return model_from_hf_tensors(cfg, tensors, dtype=dtype)
