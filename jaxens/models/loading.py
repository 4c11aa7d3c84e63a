"""Load and save members as Hugging Face directories (``config.json`` + safetensors).

``load_hf_dir(path)`` reads ``config.json``, picks the family by ``model_type`` (llama, mistral,
qwen2 → :class:`~jaxens.models.llama.Llama`; gemma3_text / gemma3 → :class:`~jaxens.models.gemma3.Gemma3`;
gpt2 → :class:`~jaxens.models.gpt2.GPT2`), reads every ``*.safetensors`` file (sharded checkpoints
through ``model.safetensors.index.json``), converts the tensors to float32, checks every shape
against the config and builds the member.  Pickle checkpoints (``.bin``, ``.pt``, ``.pth``) are refused:
loading them runs arbitrary code.  ``save_hf_dir(model, path)`` writes the same layout back, which
``transformers.AutoModelForCausalLM.from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

import jaxens.models.gemma3 as gemma3
import jaxens.models.gpt2 as gpt2
import jaxens.models.llama as llama

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class Family(NamedTuple):
    """One model family: its config class, module class and transformers tensor mapping."""

    config: type
    model: type
    params_from_hf: Callable
    params_to_hf: Callable


_LLAMA = Family(llama.LlamaConfig, llama.Llama, llama.params_from_hf, llama.params_to_hf)
_GEMMA3 = Family(gemma3.Gemma3Config, gemma3.Gemma3, gemma3.params_from_hf, gemma3.params_to_hf)
_GPT2 = Family(gpt2.GPT2Config, gpt2.GPT2, gpt2.params_from_hf, gpt2.params_to_hf)
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


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy arrays (bf16/f16 upcast)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    try:
        out = {}
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
        return out
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"file {path} is truncated or not a valid safetensors file: {e}") from e


def model_from_hf_tensors(hf_config: Mapping, tensors: Mapping[str, np.ndarray], dtype: str = "float32"):
    """Build a member from a transformers config dict and a transformers-named float state dict."""
    mt = hf_config.get("model_type")
    if mt is None:
        raise ValueError("config has no 'model_type'")
    cfg_cls, model_cls, from_hf, _ = family(mt)
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
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.resolve().is_relative_to(path.resolve()):
            raise ValueError(f"weight file {f} lies outside the checkpoint directory {path}")
        tensors.update(read_safetensors(f))
    return model_from_hf_tensors(hf_config, tensors, dtype=dtype)


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

