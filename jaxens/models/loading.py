"""Load and save members as Hugging Face directories (``config.json`` + safetensors).

``load_hf_dir(path)`` reads ``config.json``, picks the family by ``model_type`` (llama, mistral,
qwen2 → :class:`~jaxens.models.llama.Llama`; gemma3_text / gemma3 → :class:`~jaxens.models.gemma3.Gemma3`;
gpt2 → :class:`~jaxens.models.gpt2.GPT2`), reads every ``*.safetensors`` file (sharded checkpoints
through ``model.safetensors.index.json``), checks every name and shape against the config and
builds the member one tensor at a time (:func:`jaxens.models.assemble.assemble`): each tensor is
read from the file in row chunks (plain reads, the file is never mapped) straight into the
member's dtype, so loading peaks at the member's weights plus about two copies of its largest
tensor.  Pickle checkpoints (``.bin``, ``.pt``, ``.pth``) are refused:
loading them runs arbitrary code.  ``save_hf_dir(model, path)`` writes the same layout back, which
``transformers.AutoModelForCausalLM.from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

import jaxens.models.gemma3 as gemma3
import jaxens.models.gemma3.params as gemma3_params
import jaxens.models.gpt2 as gpt2
import jaxens.models.gpt2.params as gpt2_params
import jaxens.models.llama as llama
import jaxens.models.llama.params as llama_params
from jaxens.models.assemble import aligned_empty, assemble

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class Family(NamedTuple):
    """One model family: its config class, module class, transformers tensor mapping and its
    ``params`` module (``HF_TOP``, ``HF_LAYER``, ``hf_names``) for the tensor-at-a-time loader."""

    config: type
    model: type
    params_from_hf: Callable
    params_to_hf: Callable
    tables: Any


_LLAMA = Family(llama.LlamaConfig, llama.Llama, llama.params_from_hf, llama.params_to_hf, llama_params)
_GEMMA3 = Family(gemma3.Gemma3Config, gemma3.Gemma3, gemma3.params_from_hf, gemma3.params_to_hf, gemma3_params)
_GPT2 = Family(gpt2.GPT2Config, gpt2.GPT2, gpt2.params_from_hf, gpt2.params_to_hf, gpt2_params)
# transformers ``model_type`` -> family
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gemma3_text": _GEMMA3, "gemma3": _GEMMA3,
    "gpt2": _GPT2,
}


def family(model_type: str) -> Family:
    """The family of a transformers ``model_type`` (``ValueError`` for an unsupported one)."""
    if model_type not in FAMILIES:
        raise ValueError(f"Unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def pickle_refusal(path: Path) -> ValueError:
    """The error for a pickle checkpoint, with the command that converts it to safetensors."""
    return ValueError(
        f"{path} is a pickle checkpoint; jaxens does not load pickles (loading one can run arbitrary code). "
        "Convert it to safetensors once, in a trusted environment: python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{path.parent if path.is_file() else path}')"
        ".save_pretrained('OUT_DIR', safe_serialization=True)\" and load OUT_DIR."
    )


# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which jax ships)
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CHUNK_BYTES = 1 << 24  # read at most ~16 MiB at a time


class SafetensorsTensor:
    """One tensor of a safetensors file, read with plain file reads (row chunks) when loaded."""

    def __init__(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], offset: int):
        self.path, self.name, self.shape, self.offset = path, name, shape, offset
        if dtype not in _ST_DTYPES:
            raise ValueError(f"file {path}: tensor {name!r} has dtype {dtype}, which jaxens does not read")
        self.src = np.dtype(_ST_DTYPES[dtype])

    def load(self, dtype=np.float32) -> np.ndarray:
        """The tensor as ``dtype`` (one aligned buffer, filled chunk by chunk)."""
        out = aligned_empty(self.shape, dtype)
        flat = out.reshape(-1)
        step = max(1, CHUNK_BYTES // self.src.itemsize)
        with open(self.path, "rb") as f:
            for e0 in range(0, flat.size, step):
                e1 = min(flat.size, e0 + step)
                f.seek(self.offset + e0 * self.src.itemsize)
                chunk = np.fromfile(f, dtype=self.src, count=e1 - e0)
                if chunk.size != e1 - e0:
                    raise ValueError(f"file {self.path} is truncated: tensor {self.name} ends past the end of the file")
                flat[e0:e1] = chunk
        return out


def safetensors_index(path: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """The tensors of one safetensors file, unread, in file order (the header is validated by
    ``safetensors.safe_open``; a truncated or corrupt file is a ``ValueError`` naming it)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    try:
        with safe_open(str(path), framework="numpy") as f:  # validates header, offsets and dtypes
            names = list(f.keys())
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        base = 8 + n
        entries = sorted(((header[k]["data_offsets"][0], k) for k in names))
        return {k: SafetensorsTensor(path, k, header[k]["dtype"], tuple(int(d) for d in header[k]["shape"]),
                                     base + int(off)) for off, k in entries}
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"file {path} is truncated or not a valid safetensors file: {e}") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy arrays (bf16/f16 upcast)."""
    try:
        return {k: t.load(np.float32) for k, t in safetensors_index(path).items()}
    except (OSError, ValueError, TypeError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"file {path} is truncated or not a valid safetensors file: {e}") from e


def model_from_hf_tensors(hf_config: Mapping, tensors: Mapping[str, np.ndarray], dtype: str = "float32"):
    """Build a member from a transformers config dict and a transformers-named float state dict."""
    mt = hf_config.get("model_type")
    if mt is None:
        raise ValueError("config has no 'model_type'")
    cfg_cls, model_cls, from_hf, _, _ = family(mt)
    config = cfg_cls.from_hf(hf_config, dtype=dtype)
    return model_cls(config, from_hf(config, tensors))


def load_hf_dir(path: str | os.PathLike, dtype: str = "float32"):
    """Load a member from a Hugging Face directory with ``config.json`` and safetensors weights."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(path)
        raise ValueError(f"{path} is a file; pass the checkpoint directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: expected a Hugging Face checkpoint directory")
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / f for f in files]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise pickle_refusal(pickles[0])
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    tensors: dict[str, SafetensorsTensor] = {}
    for f in files:
        if not f.resolve().is_relative_to(path.resolve()):
            raise ValueError(f"weight file {f} lies outside the checkpoint directory {path}")
        tensors.update(safetensors_index(f))
    mt = hf_config.get("model_type")
    if mt is None:
        raise ValueError("config has no 'model_type'")
    fam = family(mt)
    config = fam.config.from_hf(hf_config, dtype=dtype)
    t = fam.tables
    return assemble(fam.model, config, t.HF_TOP, t.HF_LAYER, t.hf_names(tensors), desc=f"loading {path.name}")


def save_hf_dir(model, path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (float32) in transformers' naming."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    to_hf = family(cfg["model_type"]).params_to_hf
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_hf(model.config, model.params_numpy()).items()}
    cfg["torch_dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path

