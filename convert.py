"""Upstream's import path for HF <-> TE conversion; it lives in `model/convert.py`.

from convert import convert_llama_hf_to_te, convert_llama_te_to_hf
hf_model = convert_llama_te_to_hf(te_model)            # a plain LlamaForCausalLM (vLLM, SGLang, CPU)
"""

from model.convert import (
    convert_llama_hf_to_te,
    convert_llama_te_to_hf,
    hf_config_from_te,
    hf_to_te_state_dict,
    te_config_from_hf,
    te_to_hf_state_dict,
)

__all__ = [
    "convert_llama_hf_to_te",
    "convert_llama_te_to_hf",
    "hf_config_from_te",
    "hf_to_te_state_dict",
    "te_config_from_hf",
    "te_to_hf_state_dict",
]
