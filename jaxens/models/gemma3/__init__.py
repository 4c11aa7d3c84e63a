"""The Gemma3 family: NNX modules and config (:mod:`.model`), tensor-name mapping (:mod:`.params`)."""

from jaxens.models.gemma3.model import Gemma3, Gemma3Config
from jaxens.models.gemma3.params import init_params, params_from_hf, params_to_hf, tensor_from_gguf

__all__ = ["Gemma3Config", "Gemma3", "init_params", "params_from_hf", "params_to_hf", "tensor_from_gguf"]
