"""Upstream's import path for HF <-> TE conversion (it lives in `model/convert.py`), and a plain-Llama export.

    from convert import convert_llama_hf_to_te, convert_llama_te_to_hf
    hf_model = convert_llama_te_to_hf(te_model)            # a plain LlamaForCausalLM (vLLM, SGLang, CPU)

    python convert.py ckpt/final_model llama_hf/           # any saved form -> a plain Llama directory

The directory `convert.py` writes is a `LlamaForCausalLM` (BF16 safetensors, `config.json` without remote code)
with the tokenizer: what vLLM and SGLang serve and `AutoModelForCausalLM.from_pretrained` loads as is. It
takes what `evaluate.py --model` takes: `final_model`, `best_model`, an HF directory or a `step_N` checkpoint.
"""

import argparse
from pathlib import Path

import torch

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


def main(argv=None) -> Path:
    """Write MODEL as a plain Llama directory at OUT; returns OUT."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="final_model, best_model, an HF directory or a step_N checkpoint")
    p.add_argument("out", type=Path, help="the directory to write (must not hold a model yet)")
    args = p.parse_args(argv)
    if (args.out / "config.json").exists():
        raise ValueError(f"{args.out} already holds a model; pass a new directory.")
    from use.inference import load_model

    model, tokenizer = load_model(args.model, use_te=False, device="cpu")  # the HF model: plain Llama
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.model} -> {args.out} (LlamaForCausalLM, BF16)")
    return args.out


if __name__ == "__main__":
    from config.command_line import run_tool

    run_tool(main)
