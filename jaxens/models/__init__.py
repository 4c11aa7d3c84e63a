"""Member models: one architecture family per folder (``llama/``, ``gemma3/``, ``gpt2/``, each with
its NNX modules in ``model.py`` and its tensor-name mapping in ``params.py``), the shared layers,
the safetensors / GGUF loaders and the GGUF tokenizer."""

from jaxens.models.base import KVCache, Member, accepts_logits_keyword
from jaxens.models.forward import full_logits, perplexity, sequence_nll, token_nll
from jaxens.models.gemma3 import Gemma3, Gemma3Config
from jaxens.models.gguf import gguf_to_hf, load_gguf, read_metadata
from jaxens.models.gpt2 import GPT2, GPT2Config
from jaxens.models.llama import Llama, LlamaConfig
from jaxens.models.loading import load_hf_dir, model_from_hf_tensors, read_safetensors, save_hf_dir
from jaxens.models.tokenizer import tokenizer_from_gguf

__all__ = [
    "GPT2", "GPT2Config", "Gemma3", "Gemma3Config", "KVCache", "Llama", "LlamaConfig", "Member",
    "accepts_logits_keyword",
    "full_logits", "gguf_to_hf", "load_gguf", "load_hf_dir", "model_from_hf_tensors", "perplexity",
    "read_metadata", "read_safetensors", "save_hf_dir", "sequence_nll", "token_nll", "tokenizer_from_gguf",
]
