"""The Llama family: NNX modules and config (:mod:`.model`), tensor-name mapping (:mod:`.params`)."""

from jaxens.models.llama.model import Llama, LlamaConfig
from jaxens.models.llama.params import init_params, params_from_hf, params_to_hf, tensor_from_gguf

__all__ = ["LlamaConfig", "Llama", "init_params", "params_from_hf", "params_to_hf", "tensor_from_gguf"]
