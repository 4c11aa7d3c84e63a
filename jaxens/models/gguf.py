"""Read GGUF checkpoints (llama.cpp's format) into float weights and a transformers-style config.

``load_gguf(path)`` dequantises every tensor with the ``gguf`` package (Q4_0/1, Q5_*, Q8_0, K-quants,
F16, ...), renames it to transformers' naming with the family's tables (``GGUF_BLOCK`` /
``GGUF_TOP`` in ``jaxens.models.<family>.params``), undoes llama.cpp's layout conversions with the
family's ``tensor_from_gguf`` (Llama's rotary permutation of ``W_q``/``W_k``, Gemma 3's ``1 + w``
norm weights, GPT-2's transposed projections), and builds the member through the same path as a
Hugging Face directory.  The config comes from the GGUF metadata (``<arch>.embedding_length``,
``<arch>.block_count``, ...).

Memory: :func:`load_gguf` never holds the dequantised checkpoint.  Each tensor is read with
``pread`` (the file is never mapped, so its pages do not count in the process's resident set)
and dequantised in row chunks of about :data:`CHUNK_BYTES` into one aligned float32 buffer,
which :func:`jaxens.models.assemble.assemble` places in the member before the next tensor is
read.  :func:`gguf_to_hf` (every tensor as a float32 dict) remains for inspection and tests.
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
from jaxens.models.assemble import aligned_empty, assemble
from jaxens.models.loading import PICKLE_SUFFIXES, family, pickle_refusal

CHUNK_BYTES = 1 << 24  # dequantise at most ~16 MiB of float32 at a time

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
    return _guarded(Path(path), lambda *a: _convert(*a, progress))


class GGUFTensor:
    """One GGUF tensor, read with ``pread`` and dequantised in row chunks when loaded."""

    def __init__(self, path: Path, t, arch: str, cfg: dict):
        self.path, self.t, self.arch, self.cfg = path, t, arch, cfg
        self.gguf_shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # numpy (row-major) order

    def load(self, dtype=np.float32) -> np.ndarray:
        """The dequantised float32 tensor in transformers' convention (``tensor_from_gguf``)."""
        t, path = self.t, self.path
        raw_shape = tuple(int(s) for s in t.data.shape)  # no page of the data is touched
        item = np.dtype(t.data.dtype)
        rows = int(np.prod(raw_shape[:-1], dtype=np.int64)) if len(raw_shape) > 1 else 1
        row_items = raw_shape[-1] if raw_shape else 1
        row_bytes = row_items * item.itemsize
        out = aligned_empty(self.gguf_shape, np.float32)
        if out.size != t.n_elements:
            raise ValueError(f"file {path} is truncated or corrupt: tensor {t.name} has {t.n_elements} values, "
                             f"expected shape {self.gguf_shape}")
        flat = out.reshape(rows, -1)
        step = max(1, CHUNK_BYTES // max(1, 4 * flat.shape[1]))
        with open(path, "rb") as f:
            fd = f.fileno()
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                n = (r1 - r0) * row_bytes
                buf = os.pread(fd, n, t.data_offset + r0 * row_bytes)
                if len(buf) != n:
                    raise ValueError(f"file {path} is truncated: tensor {t.name} ends past the end of the file")
                chunk = np.frombuffer(buf, dtype=item).reshape(r1 - r0, row_items)
                try:
                    flat[r0:r1] = np.asarray(gguf.dequantize(chunk, t.tensor_type), np.float32).reshape(r1 - r0, -1)
                except Exception as e:
                    raise ValueError(f"file {path}: cannot dequantise tensor {t.name} ({t.tensor_type.name}): "
                                     f"{e}") from e
                del buf, chunk
        return _PARAMS[self.arch].tensor_from_gguf(self.arch, t.name, out, self.cfg)


def _lazy(path, reader, meta, n_vocab, arch) -> tuple[dict, dict[str, GGUFTensor]]:
    """``(transformers config, transformers name -> lazy tensor)`` in file order."""
    names = {t.name for t in reader.tensors}
    cfg = _hf_config(meta, names, n_vocab)
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        hf = _hf_name(arch, t.name)
        if hf is None:
            raise ValueError(f"GGUF tensor {t.name!r} ({arch}) has no counterpart in jaxens")
        tensors[hf] = GGUFTensor(path, t, arch, cfg)
    if arch == "gpt2" and cfg.get("vocab_size") and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")  # GPT-2 ties the head in transformers
    return cfg, tensors


def _convert(path, reader, meta, n_vocab, arch, progress):
    cfg, lazy = _lazy(path, reader, meta, n_vocab, arch)
    it = tqdm(lazy.items(), desc=f"dequantising {path.name}", disable=not progress, leave=False)
    return cfg, {name: t.load() for name, t in it}


def _guarded(path: Path, fn):
    """``fn(path, reader, meta, n_vocab, arch)`` with bad files reported as ``ValueError`` naming ``path``."""
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
        return fn(path, reader, meta, n_vocab, arch)
    except (ValueError, KeyError, IndexError, TypeError, StopIteration) as e:
        if str(path) in str(e):
            raise
        raise ValueError(
            f"file {path}: {type(e).__name__}: {e} (the file is truncated, corrupt, or of an "
            "architecture jaxens does not support)"
        ) from e


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, progress: bool = True):
    """Load a member from a GGUF file (dequantised to float32, then cast to ``dtype``), one tensor
    at a time (see the module docstring: the peak is the member's weights plus about two copies of
    its largest tensor)."""
    path = Path(path)

    def build(path, reader, meta, n_vocab, arch):
        cfg, lazy = _lazy(path, reader, meta, n_vocab, arch)
        fam = family(cfg["model_type"])
        config = fam.config.from_hf(cfg, dtype=dtype)
        tables = fam.tables
        return assemble(fam.model, config, tables.HF_TOP, tables.HF_LAYER, tables.hf_names(lazy),
                        progress=progress, desc=f"loading {path.name}")

    return _guarded(path, build)
