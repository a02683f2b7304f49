"""Model speed, side by side in one run: `NVLlamaForCausalLM` vs a bare stack of TE layers (vs HF).

    python scripts/benchmark_model.py                      # Llama-3.2-1B body, vocab 256, 2 x 8192 tokens
    python scripts/benchmark_model.py --layers 2 --steps 3 # a quick look

Each row times forward + backward + fused AdamW step on the same shapes and prints tokens/s and
its ratio to the bare stack of the same precision. The bare stack is embedding -> TE
TransformerLayers -> RMSNorm -> linear head -> cross entropy, with RoPE precomputed once: the
fastest the recipe's model could be with these kernels.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args():
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="model_configs/meta-llama/Llama-3.2-1B")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recipes", default="none,DelayedScaling,Float8CurrentScaling")
    p.add_argument("--hf", action="store_true", help="also time HF LlamaForCausalLM (sdpa)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--profile", action="store_true", help="also print where each row's GPU time goes")
    p.add_argument("--train-row", choices=["bare", "bare_thd"], default=None,
                   help="train the bare stack on full windows of --dna, write --metrics")  # fmt: skip
    p.add_argument("--dna", default=None, help="parquet of one long record (--train-row)")
    p.add_argument("--metrics", default=None, help="metrics.jsonl to write (--train-row)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--profile-steps", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="--train-row: profile these steps as the recipe's profiler.* does")  # fmt: skip
    return p.parse_args()


class BareStack(nn.Module):
    """The recipe's model without the recipe: embedding, TE layers, RMSNorm, linear head, cross-entropy."""

    def __init__(self, config, thd: bool = False):
        import transformer_engine.pytorch as te

        super().__init__()
        self.thd = thd
        kw = dict(dtype=torch.bfloat16, device="cuda")
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(
            te.TransformerLayer(
                config.hidden_size,
                config.intermediate_size,
                config.num_attention_heads,
                num_gqa_groups=config.num_key_value_heads,
                kv_channels=config.head_dim,
                bias=False,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                normalization="RMSNorm",
                activation="swiglu",
                fuse_qkv_params=True,
                qkv_weight_interleaved=True,
                attn_input_format="thd" if thd else "bshd",
                self_attn_mask_type="padding_causal" if thd else "causal",
                layer_number=i + 1,
                params_dtype=torch.bfloat16,
                device="cuda",
            )  # fmt: skip
            for i in range(config.num_hidden_layers)
        )
        self.norm = te.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        from model.modeling_llama_te import RotaryEmbedding

        self.rope = RotaryEmbedding(config)

    def forward(self, input_ids, labels, cu_seqlens=None):
        """Mean next-token loss of [B, S] ids (THD: each row is one sequence of the packed batch)."""
        h = self.embed(input_ids)
        rope = self.rope(input_ids.shape[1], h.device)
        if self.thd:  # [B, S, H] -> [B * S, H], one sequence per row
            kw = dict(
                cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=h.shape[1], max_seqlen_kv=h.shape[1]
            )
            h = h.flatten(0, 1)
            for layer in self.layers:
                h = layer(h, rotary_pos_emb=rope, **kw)
            h = h.view(input_ids.shape[0], input_ids.shape[1], -1)
        else:
            for layer in self.layers:
                h = layer(h, rotary_pos_emb=rope)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def time_steps(step, steps, warmup):
    """Seconds per call of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


# GPU kernel name fragments -> category, first match wins (cuBLAS/cuDNN/TE kernel names).
KERNEL_CATEGORIES = [
    ("attention", ("fmha", "flash", "attn", "cudnn_generated", "sm90_xmma_warpspecialized_fprop_fmha")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas")),
    ("fp8 cast/amax", ("cast", "quantize", "amax", "scale", "transpose")),
    ("norm", ("rmsnorm", "norm")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("loss/softmax", ("softmax", "cross_entropy", "log_softmax", "nll")),
    ("rope", ("rope", "rotary")),
]


def profile_breakdown(step, steps: int = 3) -> dict[str, float]:
    """Fraction of GPU kernel time by category over `steps` steps, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name != "CUDA":
            continue
        name = event.key.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + event.self_device_time_total
    total = sum(totals.values()) or 1.0
    return {k: v / total for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def random_batches(args) -> tuple[torch.Tensor, dict]:
    """Random DNA-vocabulary ids [B, S], and the same tokens as one packed THD row of B sequences."""
    tokens = args.batch * args.seq
    ids = torch.randint(4, 256, (args.batch, args.seq), device="cuda")
    cu_seqlens = torch.arange(0, tokens + 1, args.seq, device="cuda", dtype=torch.int32)
    thd = {"input_ids": ids.view(1, -1), "labels": ids.view(1, -1), "cu_seq_lens_q": cu_seqlens,
           "cu_seq_lens_k": cu_seqlens, "max_length_q": args.seq, "max_length_k": args.seq}  # fmt: skip
    return ids, thd


def make_model(kind: str, hf_config):
    """One row's model, seeded the same: `bare`/`bare_thd` stacks, HF (sdpa), or NVLlama (`bshd`/`thd`)."""
    from transformers import LlamaForCausalLM

    from model.convert import te_config_from_hf
    from model.modeling_llama_te import NVLlamaForCausalLM

    torch.manual_seed(0)
    if kind.startswith("bare"):
        return BareStack(hf_config, thd=kind == "bare_thd")
    if kind == "hf":
        hf_config._attn_implementation = "sdpa"
        return LlamaForCausalLM(hf_config).to("cuda", torch.bfloat16)
    return NVLlamaForCausalLM(te_config_from_hf(hf_config, attn_input_format=kind, dtype=torch.bfloat16))


def measure(kind: str, recipe_name: str, hf_config, args) -> dict:
    """Time forward + backward + fused AdamW of one model kind and precision."""
    import transformer_engine.pytorch as te

    from model.fp8 import build_fp8_recipe

    recipe = None if recipe_name == "none" else build_fp8_recipe(recipe_name)
    ids, thd = random_batches(args)
    model = make_model(kind, hf_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with te.autocast(enabled=recipe is not None, recipe=recipe):
            if kind.startswith("bare"):
                loss = model(ids, ids, thd["cu_seq_lens_q"])
            elif kind == "thd":
                loss = model(**thd).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, args.steps, args.warmup)
    row = {"precision": "bf16" if recipe is None else recipe_name, "model": kind, "step_ms": seconds * 1e3,
           "tokens_per_s": ids.numel() / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    if args.profile:
        row["gpu_time"] = profile_breakdown(step)
        print(row["precision"], kind, " ".join(f"{k} {v:.1%}" for k, v in row["gpu_time"].items()))
    return row


def train_bare_row(args, hf_config):
    """`benchmark_training.py`'s bare rows: the bare stack trained on full windows, logged like the recipe.

    Full `--seq`-token windows of the DNA in `--dna`, `--batch` per step, fused AdamW with the recipe's
    settings and gradient clipping at 1.0; tokens/s, MFU (`perf_logger.ModelFlops`), step time and peak
    memory per `--log-every` steps go to `--metrics`, with one GPU sync per log window as the recipe does.
    """
    import pyarrow.parquet as pq
    import transformer_engine.pytorch as te

    from model.fp8 import build_fp8_recipe
    from perf_logger import ModelFlops, peak_flops
    from training.profiling import StepProfiler

    recipe = None if args.recipes == "none" else build_fp8_recipe(args.recipes)
    text = pq.read_table(args.dna).column("sequence")[0].as_py().encode()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()  # the nucleotide tokenizer: id = byte
    windows = tokens[: len(tokens) // args.seq * args.seq].view(-1, args.seq)
    model = make_model(args.train_row, hf_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    flops = ModelFlops(hf_config).of_batch({"input_ids": windows[: args.batch]})
    cu_seqlens = torch.arange(0, args.batch * args.seq + 1, args.seq, device="cuda", dtype=torch.int32)
    start_step, end_step = args.profile_steps or (0, 0)
    profiler_cfg = SimpleNamespace(enabled=bool(args.profile_steps), start_step=start_step, end_step=end_step)
    profiler = StepProfiler(profiler_cfg, Path(args.metrics).parent, rank=0)  # profiler/rank0_summary.txt
    records = []
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        profiler.step_begins(step)
        first = (step - 1) * args.batch % (len(windows) - args.batch)
        ids = windows[first : first + args.batch].to("cuda", non_blocking=True)
        with te.autocast(enabled=recipe is not None, recipe=recipe):
            loss = model(ids, ids, cu_seqlens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        profiler.step_ends(step)
        if step % args.log_every == 0:
            loss = torch.stack(losses).mean().item()  # the window's sync, before the clock (as the recipe logs)
            seconds = (time.perf_counter() - start) / args.log_every
            tokens_per_s = args.batch * args.seq / seconds
            records.append({"step": step, "loss": loss, "step_time_s": seconds,
                            "tokens_per_s_per_gpu": tokens_per_s, "real_tokens_per_s_per_gpu": tokens_per_s,
                            "mfu": flops / seconds / peak_flops(torch.device("cuda")), "data_wait_fraction": 0.0,
                            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
            losses, start = [], time.perf_counter()
    Path(args.metrics).write_text("".join(json.dumps(r) + "\n" for r in records))


def main():
    """Every (precision, model) row, then a table with each row's ratio to the bare stack."""
    args = parse_args()
    from transformers import AutoConfig

    overrides = {"vocab_size": 256} | ({"num_hidden_layers": args.layers} if args.layers else {})
    hf_config = AutoConfig.from_pretrained(args.config, **overrides)
    if args.train_row:
        train_bare_row(args, hf_config)
        return
    rows = []
    kinds = ["bare", "bshd", "bare_thd", "thd"] + (["hf"] if args.hf else [])
    for recipe_name in args.recipes.split(","):
        for kind in kinds:
            if kind != "hf" or recipe_name == "none":
                rows.append(measure(kind, recipe_name, hf_config, args))
                torch.cuda.empty_cache()

    bare = {r["precision"]: r["tokens_per_s"] for r in rows if r["model"] == "bare"}
    print(f"{torch.cuda.get_device_name()}, {hf_config.num_hidden_layers} layers, {args.batch} x {args.seq} tokens")
    print(f"{'precision':22s} {'model':6s} {'step ms':>9s} {'tokens/s':>10s} {'vs bare':>8s} {'peak GiB':>9s}")
    for r in rows:
        r["vs_bare"] = r["tokens_per_s"] / bare[r["precision"]]
        print(f"{r['precision']:22s} {r['model']:6s} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['vs_bare']:8.3f} {r['peak_gib']:9.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
