"""HF <-> TE weight mapping, configs and exports on the CPU (no TE needed)."""

import json

import pytest
import torch
from conftest import RECIPE_DIR, TOKENIZER
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from checkpointing.export import export_hf_model, export_te_model
from model.convert import hf_config_from_te, hf_to_te_state_dict, te_config_from_hf, te_to_hf_state_dict


def tiny_hf_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, bos_token_id=2, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip


@pytest.mark.parametrize("tie", [True, False])
def test_hf_te_hf_round_trip_is_exact(tie):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_hf_config(tie))
    hf_state = hf.state_dict()
    te_state = hf_to_te_state_dict(hf_state, hf.config)
    back = te_to_hf_state_dict(te_state, hf.config)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_qkv_is_interleaved_per_kv_group():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_hf_config(False))
    state = hf.state_dict()
    qkv = hf_to_te_state_dict(state, hf.config)["model.layers.0.self_attention.layernorm_qkv.weight"]
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    group, hd = 4, 8  # 8 query heads over 2 KV heads
    # KV group 1 holds query heads 4..7, then key head 1, then value head 1.
    block = qkv.view(2, (group + 2) * hd, 64)[1]
    assert torch.equal(block[: group * hd], q[group * hd : 2 * group * hd])
    assert torch.equal(block[group * hd : (group + 1) * hd], k[hd : 2 * hd])
    assert torch.equal(block[(group + 1) * hd :], v[hd : 2 * hd])
    fc1 = hf_to_te_state_dict(state, hf.config)["model.layers.0.layernorm_mlp.fc1_weight"]
    assert torch.equal(fc1, torch.cat([state["model.layers.0.mlp.gate_proj.weight"],
                                       state["model.layers.0.mlp.up_proj.weight"]]))  # fmt: skip


def test_config_round_trip():
    hf_config = AutoConfig.from_pretrained(RECIPE_DIR / "model_configs/meta-llama/Llama-3.2-1B", vocab_size=256)
    te_config = te_config_from_hf(hf_config, attn_input_format="bshd")
    assert te_config.attn_input_format == "bshd" and te_config.vocab_size == 256
    back = hf_config_from_te(te_config).to_dict()
    original = hf_config.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rope_parameters", "tie_word_embeddings"):
        assert back[key] == original[key]


def _te_state(tie: bool):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_hf_config(tie))
    te_config = te_config_from_hf(hf.config)
    return hf, te_config, hf_to_te_state_dict(hf.state_dict(), te_config)


def test_te_export_directory_is_loadable_by_automodel(tmp_path):
    _, te_config, state = _te_state(tie=True)
    state["model.layers.0.self_attention.proj._extra_state"] = torch.zeros(3)  # FP8 state never exported
    out = export_te_model(tmp_path / "final_model", state, te_config, AutoTokenizer.from_pretrained(TOKENIZER))
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_llama_te.py", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_te.NVLlamaForCausalLM"
    assert config["model_type"] == "nvllama" and config["architectures"] == ["NVLlamaForCausalLM"]
    weights = load_file(out / "model.safetensors")
    assert not any(k.endswith("_extra_state") for k in weights) and "lm_head.weight" not in weights
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "NVLlamaConfig" and loaded.attn_input_format == "thd"


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_loads_as_llama_and_generates(tmp_path, tie):
    hf, te_config, state = _te_state(tie)
    out = export_hf_model(tmp_path / "hf", state, te_config, AutoTokenizer.from_pretrained(TOKENIZER))
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    hf.eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["ACGTACGT"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, hf(**inputs).logits)
        generated = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)
