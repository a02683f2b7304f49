"""Convert between HF `LlamaForCausalLM` and `NVLlamaForCausalLM` by weight name.

    from model.convert import convert_llama_hf_to_te, convert_llama_te_to_hf
    te_model = convert_llama_hf_to_te(hf_model)            # needs TransformerEngine and a GPU
    hf_model = convert_llama_te_to_hf(te_model)            # a plain LlamaForCausalLM (vLLM, SGLang, CPU)

The state-dict mapping itself (`hf_to_te_state_dict`, `te_to_hf_state_dict`) is pure tensor work and
runs without TE. TE fuses q, k and v into one interleaved weight: for each KV group, its query heads,
then its key head, then its value head. The SwiGLU `fc1` weight is `cat(gate, up)`.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM
from model.shape import head_dim_of

_RENAMES = {  # HF suffix in a layer -> TE suffix (one tensor each)
    "input_layernorm.weight": "self_attention.layernorm_qkv.layer_norm_weight",
    "self_attn.o_proj.weight": "self_attention.proj.weight",
    "post_attention_layernorm.weight": "layernorm_mlp.layer_norm_weight",
    "mlp.down_proj.weight": "layernorm_mlp.fc2_weight",
}
_QKV = "self_attention.layernorm_qkv.weight"
_FC1 = "layernorm_mlp.fc1_weight"


def _shape(config) -> tuple[int, int, int]:
    return config.num_attention_heads, config.num_key_value_heads, head_dim_of(config)


def hf_to_te_state_dict(hf_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """HF Llama weights renamed and fused (interleaved QKV, gate+up) for `NVLlamaForCausalLM`."""
    n_heads, n_kv, head_dim = _shape(config)
    group = n_heads // n_kv
    out = {}
    for name, tensor in hf_state.items():
        if not name.startswith("model.layers."):
            out[name] = tensor
            continue
        prefix, suffix = name.split(".", 3)[:3], name.split(".", 3)[3]
        layer = ".".join(prefix)
        if suffix in _RENAMES:
            out[f"{layer}.{_RENAMES[suffix]}"] = tensor
        elif suffix == "self_attn.q_proj.weight":
            hidden = tensor.shape[1]
            q = tensor.view(n_kv, group * head_dim, hidden)
            k = hf_state[f"{layer}.self_attn.k_proj.weight"].view(n_kv, head_dim, hidden)
            v = hf_state[f"{layer}.self_attn.v_proj.weight"].view(n_kv, head_dim, hidden)
            out[f"{layer}.{_QKV}"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        elif suffix == "mlp.gate_proj.weight":
            out[f"{layer}.{_FC1}"] = torch.cat([tensor, hf_state[f"{layer}.mlp.up_proj.weight"]], dim=0)
        elif suffix not in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight"):
            raise KeyError(f"No TE name for HF weight {name!r}.")
    return out


def te_to_hf_state_dict(te_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`NVLlamaForCausalLM` weights split back into HF Llama names (the inverse of `hf_to_te_state_dict`)."""
    n_heads, n_kv, head_dim = _shape(config)
    group = n_heads // n_kv
    back = {te_name: hf_name for hf_name, te_name in _RENAMES.items()}
    out = {}
    for name, tensor in te_state.items():
        if name.endswith("_extra_state"):
            continue  # TE's FP8 scaling state has no HF counterpart
        if not name.startswith("model.layers."):
            out[name] = tensor
            continue
        layer, suffix = ".".join(name.split(".", 3)[:3]), name.split(".", 3)[3]
        if suffix in back:
            out[f"{layer}.{back[suffix]}"] = tensor
        elif suffix == _QKV:
            hidden = tensor.shape[1]
            q, k, v = tensor.view(n_kv, (group + 2) * head_dim, hidden).split(
                [group * head_dim, head_dim, head_dim], 1
            )
            out[f"{layer}.self_attn.q_proj.weight"] = q.reshape(-1, hidden)
            out[f"{layer}.self_attn.k_proj.weight"] = k.reshape(-1, hidden)
            out[f"{layer}.self_attn.v_proj.weight"] = v.reshape(-1, hidden)
        elif suffix == _FC1:
            gate, up = tensor.chunk(2, dim=0)
            out[f"{layer}.mlp.gate_proj.weight"], out[f"{layer}.mlp.up_proj.weight"] = gate, up
        else:
            raise KeyError(f"No HF name for TE weight {name!r}.")
    return out


def te_config_from_hf(hf_config: LlamaConfig, **overrides) -> NVLlamaConfig:
    """An `NVLlamaConfig` with the HF config's shape; `overrides` set the TE-only fields."""
    values = {k: v for k, v in hf_config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    return NVLlamaConfig(**{**values, **overrides})


def hf_config_from_te(te_config: NVLlamaConfig) -> LlamaConfig:
    """A plain `LlamaConfig` with the TE config's shape (TE-only fields dropped)."""
    drop = (
        "embedding_init_std",
        "use_megatron_scaled_init",
        "model_type",
        "architectures",
        "auto_map",
        "attn_input_format",
        "self_attn_mask_type",
        "loss_chunk_size",
        "layer_precision",
        "use_quantized_model_init",
    )
    return LlamaConfig(**{k: v for k, v in te_config.to_dict().items() if k not in drop})


def convert_llama_hf_to_te(hf_model: LlamaForCausalLM, **config_overrides) -> NVLlamaForCausalLM:
    """A TE model with the HF model's weights (`config_overrides`, e.g. attn_input_format="bshd")."""
    config = te_config_from_hf(hf_model.config, **config_overrides)
    te_model = NVLlamaForCausalLM(config)
    state = hf_to_te_state_dict(hf_model.state_dict(), config)
    missing, unexpected = te_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"HF -> TE conversion left missing={missing} unexpected={unexpected}.")
    return te_model


def convert_llama_te_to_hf(te_model: NVLlamaForCausalLM) -> LlamaForCausalLM:
    """A plain HF `LlamaForCausalLM` on the CPU with the TE model's weights."""
    config = hf_config_from_te(te_model.config)
    hf_model = LlamaForCausalLM(config)
    state = te_to_hf_state_dict(te_model.state_dict(), config)
    hf_model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return hf_model.to(dtype=te_model.dtype)
