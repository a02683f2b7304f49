"""The GPU halves of tests/test_config_keys.py: keys whose effect needs a GPU with TE.

    python -m pytest -m gpu tests/test_keys_gpu.py

`use_meta_device` (meta build + materialisation), `adamw_kwargs.fused`, `fp8_config.fp8_format` and
`fp8_config.fp8_recipe_kwargs`, `fp32_master_weights` (bf16 vs fp32 parameters) and `use_torch_compile`
with DDP and FSDP2, BF16 and FP8, BSHD and THD.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_optimizer, losses, make_cfg
from safetensors.torch import load_file
from test_model_gpu import hf_config

import train_ddp
import train_fsdp2
from model.fp8 import fp8_autocast_factory

pytestmark = pytest.mark.gpu
GPU = ["use_te=true", "dataset.num_workers=1", "logger.frequency=5"]


def gpu_cfg(run_dir, *overrides):
    """L0_sanity with the TE model on the GPU."""
    return make_cfg(run_dir, *overrides, base=GPU)


def watch_model(monkeypatch, script) -> dict:
    """Record the model `script.main` builds (and whether its options asked for the meta device)."""
    seen, make = {}, script.create_model

    def create_and_watch(options, device):
        model = make(options, device)
        seen.update(model=model, on_meta=options.on_meta, built_on=next(model.parameters()).device.type)
        model.model.layers[0].register_forward_hook(lambda m, i, out: seen.update(compute_dtype=out.dtype))
        return model

    monkeypatch.setattr(script, "create_model", create_and_watch)
    return seen


@pytest.mark.parametrize("use_meta_device", [True, False])
def test_use_meta_device(tmp_path, monkeypatch, use_meta_device):
    seen = watch_model(monkeypatch, train_fsdp2)
    train_fsdp2.main(gpu_cfg(tmp_path, "num_train_steps=2", f"use_meta_device={use_meta_device}"))
    assert seen["built_on"] == ("meta" if use_meta_device else "cuda")
    assert all(p.device.type == "cuda" and torch.isfinite(p.full_tensor()).all() for p in seen["model"].parameters())


@pytest.mark.parametrize("fp32_master_weights", [False, True])
def test_fp32_master_weights_on_gpu(tmp_path, monkeypatch, fp32_master_weights):
    """bf16 parameters by default; fp32 with the key (FSDP2 casts them to bf16 for compute either way)."""
    seen = watch_model(monkeypatch, train_fsdp2)
    train_fsdp2.main(gpu_cfg(tmp_path, "num_train_steps=2", f"fp32_master_weights={fp32_master_weights}"))
    assert {p.dtype for p in seen["model"].parameters()} == {torch.float32 if fp32_master_weights else torch.bfloat16}
    assert seen["compute_dtype"] == torch.bfloat16


def test_fused_adamw_and_fp8_recipe_keys(tmp_path):
    model = torch.nn.Linear(16, 16, device="cuda")
    assert build_optimizer(gpu_cfg(tmp_path), model, "cuda").defaults["fused"]
    unfused = gpu_cfg(tmp_path, "adamw_kwargs.fused=false")
    assert not build_optimizer(unfused, model, "cuda").defaults["fused"]

    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    cfg = gpu_cfg(tmp_path, "fp8_config.enabled=true", "fp8_config.fp8_format=E4M3",
                  "+fp8_config.fp8_recipe_kwargs.amax_history_len=16")  # fmt: skip
    with fp8_autocast_factory(cfg.fp8_config, use_te=True)():
        recipe = FP8GlobalStateManager.get_fp8_recipe()
    assert (recipe.fp8_format.name, recipe.amax_history_len) == ("E4M3", 16)


@pytest.mark.parametrize(
    ("script", "overrides"),
    [
        (train_fsdp2, ["use_sequence_packing=true", "fp8_config.enabled=true"]),
        (train_ddp, ["use_sequence_packing=true", "fp8_config.enabled=true"]),
        (train_fsdp2, ["use_sequence_packing=false"]),
        (train_ddp, ["use_sequence_packing=false", "fp8_config.enabled=true"]),
    ],
    ids=["fsdp2-thd-fp8", "ddp-thd-fp8", "fsdp2-bshd-bf16", "ddp-bshd-fp8"],
)
def test_torch_compile_trains_like_eager(tmp_path, monkeypatch, script, overrides):
    """Each decoder layer compiled, losses close to eager, an export without `_orig_mod.` that loads."""
    import torch._dynamo

    common = ["num_train_steps=20", *overrides]
    script.main(gpu_cfg(tmp_path / "eager", *common))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seen = watch_model(monkeypatch, script)
    ckpt = tmp_path / "compiled" / "ckpt"
    script.main(gpu_cfg(tmp_path / "compiled", *common, "use_torch_compile=true", f"checkpoint.ckpt_dir={ckpt}",
                        "checkpoint.save_final_model=true", "checkpoint.save_every_n_steps=20"))  # fmt: skip
    assert all(layer._compiled_call_impl is not None for layer in seen["model"].model.layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled[20] == pytest.approx(eager[20], rel=0.02) and compiled[20] < compiled[5] - 1.0  # steps 1-5 mean
    weights = load_file(ckpt / "final_model" / "model.safetensors")
    assert not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in weights)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt / "final_model", trust_remote_code=True)


def test_meta_init_matches_direct_construction():
    from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM

    config = NVLlamaConfig(**hf_config(hidden_size=512, intermediate_size=1024).to_dict())
    torch.manual_seed(0)
    direct = NVLlamaForCausalLM(config)
    with torch.device("meta"):
        meta = NVLlamaForCausalLM(config)
    meta.init_empty_weights("cuda")
    for (name, a), (_, b) in zip(direct.named_parameters(), meta.named_parameters()):
        assert b.device.type == "cuda" and torch.isfinite(b).all(), name
        a, b = a.float(), b.float()
        assert abs(a.mean() - b.mean()) < 3e-3 and abs(a.std() - b.std()) < 0.05 * a.std() + 1e-6, name
    rope = meta.model.rotary_emb(64, torch.device("cuda"))
    assert torch.equal(rope, direct.model.rotary_emb(64, torch.device("cuda")))


def test_fsdp2_meta_init_matches_direct_construction(tmp_path):
    """The training path of train_fsdp2.py: build on meta, fully_shard, then init_empty_weights on the shards.

    Same statistics per parameter as direct construction, no two matrices drawn alike, the tie kept, and the
    sharded model computes what an unsharded model with the same weights computes. (Untrained losses of different
    draws are not compared: on 4-letter DNA they spread by more than a nat from one seed to the next.)
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    config = NVLlamaConfig(**hf_config(hidden_size=512, intermediate_size=1024, tie_word_embeddings=True).to_dict())
    torch.manual_seed(0)
    direct = NVLlamaForCausalLM(config).cuda()
    with torch.device("meta"):
        sharded = NVLlamaForCausalLM(config)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    sharded.init_empty_weights("cuda")
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    full = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    for name, a in direct.named_parameters():
        b = full[name].float()
        assert torch.isfinite(b).all(), name
        assert abs(a.float().std() - b.std()) < 0.05 * a.float().std() + 1e-6, name
    fc1 = [full[f"model.layers.{i}.layernorm_mlp.fc1_weight"].float().flatten() for i in range(2)]
    assert F.cosine_similarity(fc1[0], fc1[1], dim=0).abs() < 0.05  # independent draws

    direct.load_state_dict(full, strict=False)  # the same weights, unsharded (strict=False: TE's _extra_state)
    ids = torch.randint(4, 256, (2, 256), device="cuda")
    with torch.no_grad():
        out_direct, out_sharded = direct(input_ids=ids, labels=ids), sharded(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_sharded.logits, out_direct.logits)
    torch.testing.assert_close(out_sharded.loss, out_direct.loss)
