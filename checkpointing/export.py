"""A trained model as a Hugging Face directory (the one module that knows an export's files).

    export_model(ckpt_dir / "final_model", model, tokenizer, rank=rank, fsdp2=True)   # on every rank

`export_model` gathers the weights (FSDP2: a collective) and writes the directory next to its place first,
swapping it in at the end, so an earlier export is never left half-replaced. `export_te_model`:
`model.safetensors`, `config.json` with `auto_map`, `modeling_llama_te.py` and the tokenizer, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` gives an `NVLlamaForCausalLM`.
`export_hf_model`: the same weights as a plain `LlamaForCausalLM` directory (vLLM, SGLang, CPU inference).
Both take a full (gathered) state dict; call them on one rank.
"""

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from checkpointing.run_record import write_run_info
from model.convert import hf_config_from_te, te_to_hf_state_dict
from model.fp8 import is_fp8_tensor
from model.modeling_llama_te import AUTO_MAP, NVLlamaConfig
from runtime.distributed import barrier

logger = logging.getLogger(__name__)
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


def export_model(folder, model, tokenizer, *, rank: int, fsdp2: bool, run_info: dict | None = None) -> Path:
    """Write `folder` as a Hugging Face directory of the current weights (every rank takes part).

    The TE model is written with its modeling file (`export_te_model`), the HF reference as HF writes it.
    """
    final = Path(folder)
    partial = final.with_name(f"{final.name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    module = model.module if hasattr(model, "module") else model
    if fsdp2:  # a collective: every rank takes part, rank 0 receives the full tensors
        # FP8 weights (use_quantized_model_init) cannot be offloaded as they are (TE's tensor refuses
        # `copy_(..., non_blocking=True)`): gathered on the GPU, then dequantized and moved by the export.
        offload = not getattr(module.config, "use_quantized_model_init", False)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    else:
        state = module.state_dict()
    if rank == 0:
        if module.config.model_type == NVLlamaConfig.model_type:
            export_te_model(partial, state, module.config, tokenizer)
        else:
            module.config.use_cache = True  # off for training only (see model.build.build_model_config)
            module.save_pretrained(partial, state_dict=state)
            module.config.use_cache = False
            if tokenizer is not None:  # upstream's save_final_model_* have none to pass
                tokenizer.save_pretrained(partial)
        if run_info is not None:
            write_run_info(partial, run_info)
        old = final.with_name(f"{final.name}.old")
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("Exported the model to %s", final)
    barrier()
    return final
