"""Upstream users' features on a GPU with TE.

FP8 primary weights, per-layer precision, FP8 statistics, the profiler, upstream's generation snippet,
`save_pretrained`, upstream TE checkpoints, async saves. L0_sanity's model has 4 layers.

    python -m pytest -m gpu tests/test_upstream_gpu.py
"""

import json
import sys

import pytest
import torch
from conftest import TOKENIZER, build_model, build_optimizer, losses, make_cfg, run_command
from safetensors.torch import load_file
from test_model_gpu import hf_config, te_from_hf
from test_upstream_checkpoint import write_upstream
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import train_fsdp2
from model.fp8 import fp8_autocast_factory
from scheduler import get_cosine_annealing_schedule_with_warmup

pytestmark = pytest.mark.gpu
GPU = ["use_te=true", "dataset.num_workers=1", "logger.frequency=1"]
FP8 = ["fp8_config.enabled=true", "use_sequence_packing=true"]
CUDA = torch.device("cuda")


def gpu_cfg(run_dir, *overrides):
    return make_cfg(run_dir, *overrides, base=GPU)


def gemm_weights(layer):
    attention, mlp = layer.self_attention, layer.layernorm_mlp
    return [attention.layernorm_qkv.weight, attention.proj.weight, mlp.fc1_weight, mlp.fc2_weight]


def is_fp8(weight) -> bool:
    from transformer_engine.pytorch.tensor import QuantizedTensor

    return isinstance(getattr(weight, "_local_tensor", weight), QuantizedTensor)


@pytest.mark.parametrize("on_meta", [True, False])
def test_quantized_init_holds_fp8_weights_except_bf16_layers(tmp_path, on_meta):
    cfg = gpu_cfg(tmp_path, *FP8, "+config_kwargs.use_quantized_model_init=true",
                  "+config_kwargs.layer_precision=[null,fp8,fp8,fp8]")  # fmt: skip
    model = build_model(cfg, use_te=True, device=CUDA, on_meta=on_meta)
    if on_meta:
        model.init_empty_weights(CUDA)
    first, *rest = model.model.layers
    assert not any(is_fp8(w) for w in gemm_weights(first))  # layer_precision null: BF16
    assert all(is_fp8(w) for layer in rest for w in gemm_weights(layer))
    weight = rest[0].layernorm_mlp.fc1_weight
    std = getattr(weight, "_local_tensor", weight).dequantize().float().std().item()
    assert std == pytest.approx(0.02, rel=0.1)  # initialised as the config says (initializer_range), not empty


@pytest.mark.parametrize("recipe", ["DelayedScaling", "Float8CurrentScaling"])
def test_quantized_init_trains_like_bf16_weights_and_exports(tmp_path, recipe):
    common = [*FP8, f"fp8_config.fp8_recipe={recipe}", "num_train_steps=20"]
    train_fsdp2.main(gpu_cfg(tmp_path / "bf16_weights", *common))
    ckpt = tmp_path / "ckpt"
    train_fsdp2.main(gpu_cfg(tmp_path / "fp8_weights", *common, "+config_kwargs.use_quantized_model_init=true",
                             f"checkpoint.ckpt_dir={ckpt}", "checkpoint.save_final_model=true"))  # fmt: skip
    bf16, fp8 = losses(tmp_path / "bf16_weights"), losses(tmp_path / "fp8_weights")
    assert fp8[20] < fp8[1] - 1.0  # it learns
    assert fp8[20] == pytest.approx(bf16[20], rel=0.05), (fp8[20], bf16[20])
    weights = load_file(ckpt / "final_model" / "model.safetensors")
    assert weights["model.layers.0.layernorm_mlp.fc1_weight"].dtype == torch.bfloat16  # exported dequantized
    loaded = AutoModelForCausalLM.from_pretrained(ckpt / "final_model", trust_remote_code=True, dtype=torch.bfloat16)
    ids = torch.randint(4, 256, (1, 64), device="cuda")
    assert torch.isfinite(loaded.cuda()(input_ids=ids, labels=ids).loss)


@torch.no_grad()
def test_layer_precision_null_keeps_layers_in_bf16_under_fp8(tmp_path):
    from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM

    cfg = gpu_cfg(tmp_path, *FP8)
    fp8_autocast = fp8_autocast_factory(cfg.fp8_config, use_te=True)
    torch.manual_seed(0)
    base = NVLlamaConfig(**hf_config(num_hidden_layers=2).to_dict(), attn_input_format="bshd")
    model = NVLlamaForCausalLM(base).cuda().eval()
    ids = torch.randint(4, 256, (2, 64), device="cuda")
    bf16 = model(input_ids=ids).logits
    with fp8_autocast():
        all_fp8 = model(input_ids=ids).logits
    model.config.layer_precision = [None, None]
    with fp8_autocast():
        kept = model(input_ids=ids).logits
    assert torch.equal(kept, bf16)  # both layers ran in BF16 inside the FP8 autocast
    assert not torch.equal(all_fp8, bf16)


def test_fp8_stats_and_profiler_write_their_outputs(tmp_path):
    pytest.importorskip("nvdlfw_inspect")
    run = tmp_path / "run"
    train_fsdp2.main(gpu_cfg(run, *FP8, "num_train_steps=12", "fp8_stats_config.enabled=true",
                             "profiler.enabled=true", "profiler.start_step=3", "profiler.end_step=4"))  # fmt: skip
    logs = "".join(p.read_text() for p in (run / "fp8_stats" / "rank_0").rglob("*.log"))
    for layer in range(1, 5):  # named by TE's layer_number, from 1
        for gemm in ("self_attention.layernorm_qkv", "self_attention.proj", "layernorm_mlp.fc1", "layernorm_mlp.fc2"):
            assert f"model.model.layers.{layer}.{gemm}" in logs, (layer, gemm)
    for stat in ("underflows%", "scale_inv_min", "cur_amax"):
        assert stat in logs, stat
    trace = json.loads((run / "profiler" / "rank0.json").read_text())
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    assert len(kernels) > 50  # GPU kernels of the profiled steps are in the trace
    headline = (run / "profiler" / "rank0_summary.txt").read_text().splitlines()[0]
    busy = float(headline.split("GPU busy ")[1].split("%")[0]) / 100
    assert 0.0 < busy <= 1.0, headline


@torch.no_grad()
def test_upstream_readme_generation_snippet_works_as_written():
    """TE's own InferenceParams passed to generate, as upstream's README does; same tokens as no cache."""
    from transformer_engine.pytorch.attention import InferenceParams

    torch.manual_seed(0)
    model = te_from_hf(LlamaForCausalLM(hf_config()).to("cuda", torch.bfloat16), attn_input_format="thd")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    inputs = tokenizer("ACGTACGT", return_tensors="pt").to("cuda")
    past_key_values = InferenceParams(
        max_batch_size=1, max_sequence_length=256, num_heads_kv=model.config.num_key_value_heads,
        head_dim_k=model.config.hidden_size // model.config.num_attention_heads, dtype=torch.bfloat16,
        qkv_format="thd", max_ctx_len=256,
    )  # fmt: skip
    for layer_number in range(1, model.config.num_hidden_layers + 1):
        past_key_values.allocate_memory(layer_number)
    cached = model.generate(**inputs, max_new_tokens=16, use_cache=True, past_key_values=past_key_values)
    uncached = model.generate(**inputs, max_new_tokens=16, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_save_pretrained_of_a_te_model_loads_through_automodel(tmp_path):
    torch.manual_seed(0)
    model = te_from_hf(LlamaForCausalLM(hf_config()).to("cuda", torch.bfloat16))
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.bfloat16)
    assert type(loaded).__name__ == "NVLlamaForCausalLM"
    ids = torch.randint(4, 256, (1, 64), device="cuda")
    assert torch.equal(loaded.cuda().eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_from_an_upstream_te_fsdp2_checkpoint(tmp_path):
    """A TE FP8 model's DCP checkpoint in upstream's layout (with TE's _extra_state) continues here."""
    cfg = gpu_cfg(tmp_path, *FP8)
    fp8_autocast = fp8_autocast_factory(cfg.fp8_config, use_te=True)
    torch.manual_seed(0)
    model = build_model(cfg, use_te=True, device=CUDA, on_meta=False)
    optimizer = build_optimizer(cfg, model, CUDA)
    scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
    ids = torch.randint(4, 256, (1, 256), device="cuda")
    cu = torch.tensor([0, 256], dtype=torch.int32, device="cuda")
    for _ in range(3):
        with fp8_autocast():
            loss = model(input_ids=ids, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=256,
                         max_length_k=256).loss  # fmt: skip
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    write_upstream(tmp_path / "ckpt", "train_fsdp2", model, optimizer, scheduler, step=2)

    run = tmp_path / "run"
    train_fsdp2.main(gpu_cfg(run, *FP8, f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}", "num_train_steps=3",
                             "checkpoint.save_final_model=true"))  # fmt: skip
    assert not (run / "metrics.jsonl").exists() or not losses(run)  # 3 updates done: nothing left to train
    exported = load_file(tmp_path / "ckpt" / "final_model" / "model.safetensors")
    for name, value in model.state_dict().items():
        if not name.endswith("_extra_state") and name in exported:
            assert torch.equal(exported[name].cuda(), value), name


@pytest.mark.parametrize("script", ["train_fsdp2.py", "train_fsdp2_cp.py"])
def test_async_save_on_the_gpu_resumes_identically(tmp_path, script):
    """checkpoint.async_save=true with NCCL (dcp.async_save needs a CPU backend: gloo alongside NCCL)."""
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script,
              "--config-name", "L0_sanity", *GPU, *FP8, "cp_size=1", "checkpoint.save_every_n_steps=3",
              "checkpoint.async_save=true"]  # fmt: skip
    run_command([*common, "num_train_steps=6", f"run_dir={tmp_path / 'a'}", f"checkpoint.ckpt_dir={tmp_path / 'ca'}"])
    for steps in (3, 6):
        run_command([*common, f"num_train_steps={steps}", f"run_dir={tmp_path / 'b'}",
                     f"checkpoint.ckpt_dir={tmp_path / 'cb'}"])  # fmt: skip
    assert (tmp_path / "cb" / "step_6" / "COMPLETE").exists()
    straight, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


@pytest.mark.parametrize("on_meta", [True, False])
def test_opengenome2_inits_on_the_te_model_with_and_without_the_meta_device(tmp_path, on_meta):
    """Spike-No-More and Megatron's scaled init give the same stds built on meta (upstream's cannot) or directly."""
    cfg = gpu_cfg(tmp_path, "spike_no_more_embedding_init=true", "use_megatron_scaled_init=true")
    torch.manual_seed(0)
    model = build_model(cfg, use_te=True, device=CUDA, on_meta=on_meta)
    if on_meta:
        model.init_empty_weights(CUDA)
    layers = model.model.layers

    def std(weights) -> float:
        return torch.cat([w.detach().float().flatten() for w in weights]).std().item()

    output = std(w for layer in layers for w in (layer.self_attention.proj.weight, layer.layernorm_mlp.fc2_weight))
    other = std(
        w for layer in layers for w in (layer.self_attention.layernorm_qkv.weight, layer.layernorm_mlp.fc1_weight)
    )
    assert std([model.model.embed_tokens.weight]) == pytest.approx(1.0, rel=0.03)
    assert output == pytest.approx(0.02 / (2 * len(layers)) ** 0.5, rel=0.03)
    assert other == pytest.approx(0.02, rel=0.03) and std([model.lm_head.weight]) == pytest.approx(0.02, rel=0.03)
