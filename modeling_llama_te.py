"""Upstream's import path for the TE Llama; it lives in `model/modeling_llama_te.py` (the file exports carry).

from modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM
"""

from model.modeling_llama_te import (
    AUTO_MAP,
    HFInferenceParams,
    NVLlamaConfig,
    NVLlamaForCausalLM,
    NVLlamaModel,
    NVLlamaPreTrainedModel,
)

__all__ = [
    "AUTO_MAP",
    "HFInferenceParams",
    "NVLlamaConfig",
    "NVLlamaForCausalLM",
    "NVLlamaModel",
    "NVLlamaPreTrainedModel",
]
