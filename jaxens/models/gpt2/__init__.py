"""The GPT2 family: NNX modules and config (:mod:`.model`), tensor-name mapping (:mod:`.params`)."""

from jaxens.models.gpt2.model import GPT2, GPT2Config
from jaxens.models.gpt2.params import init_params, params_from_hf, params_to_hf, tensor_from_gguf

__all__ = ["GPT2Config", "GPT2", "init_params", "params_from_hf", "params_to_hf", "tensor_from_gguf"]
