"""Write a trained model as a Hugging Face directory.

`export_te_model`: `model.safetensors`, `config.json` with `auto_map`, `modeling_llama_te.py` and the
tokenizer, so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` gives an
`NVLlamaForCausalLM`. `export_hf_model`: the same weights as a plain `LlamaForCausalLM` directory
(vLLM, SGLang, CPU inference). Both take a full (gathered) state dict, so they work the same after
DDP and FSDP2 training; call them on one rank.
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.convert import hf_config_from_te, te_to_hf_state_dict
from model.fp8 import is_fp8_tensor
from model.modeling_llama_te import AUTO_MAP, NVLlamaConfig

MODELING_FILE = Path(__file__).resolve().parents[1] / "model" / "modeling_llama_te.py"


def _save_weights(state_dict: dict[str, torch.Tensor], path: Path, tied: bool) -> None:
    state = {
        k: (v.dequantize() if is_fp8_tensor(v) else v).detach().cpu().contiguous()  # FP8 weights: as BF16
        for k, v in state_dict.items()
        if not k.endswith("_extra_state")
    }
    if tied:
        state.pop("lm_head.weight", None)  # shared with the embedding; transformers re-ties it on load
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def export_te_model(out_dir, state_dict: dict[str, torch.Tensor], config: NVLlamaConfig, tokenizer=None) -> Path:
    """Write a TE model directory that `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(state_dict, out_dir, config.tie_word_embeddings)
    config = NVLlamaConfig.from_dict(config.to_dict())  # a copy: the training model's config is left alone
    config.auto_map, config.architectures = dict(AUTO_MAP), ["NVLlamaForCausalLM"]
    config.use_quantized_model_init = False  # the exported weights are BF16
    config.save_pretrained(out_dir)
    shutil.copy(MODELING_FILE, out_dir / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def export_hf_model(out_dir, state_dict: dict[str, torch.Tensor], config: NVLlamaConfig, tokenizer=None) -> Path:
    """Write the TE weights as a plain `LlamaForCausalLM` directory (vLLM, SGLang, CPU inference)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = hf_config_from_te(config)
    hf_config.architectures = ["LlamaForCausalLM"]
    _save_weights(te_to_hf_state_dict(state_dict, hf_config), out_dir, hf_config.tie_word_embeddings)
    hf_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
