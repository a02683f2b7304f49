"""One batch through a TE model with context parallelism and through the same weights without it.

    torchrun --nproc_per_node=2 tests/cp_equivalence.py RESULT.json     # run by tests/test_cp_gpu.py

Rank 0 writes, for THD and BSHD input and each of TE's key/value exchanges (p2p, a2a, all_gather): the
cosine similarity of the logits (real tokens, reassembled from the CP shards), both losses, and the
cosine similarity of all gradients (CP gradients summed over the CP ranks, since each rank's loss
covers only its tokens).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.collate import BshdCollator, ThdCollator, cp_shard_indices, shard_batch_for_cp  # noqa: E402
from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM  # noqa: E402


def make_model(fmt: str) -> NVLlamaForCausalLM:
    """A small NVLlama with the same weights on every rank."""
    config = NVLlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=500000.0,
        attn_input_format=fmt, dtype=torch.bfloat16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = NVLlamaForCausalLM(config).cuda()
    with torch.no_grad():
        for p in model.parameters():  # identical weights on every rank, larger than init so layers matter
            if p.ndim == 2:
                p.normal_(0, 0.05)
            dist.broadcast(p.data, 0)
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened."""
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def compare(fmt: str, comm: str, batch: dict, bounds: np.ndarray, real: torch.Tensor) -> dict:
    """Logits, loss and gradients of one batch with CP (`comm` exchange) and without, on every rank."""
    rank, cp_size = dist.get_rank(), dist.get_world_size()
    reference, parallel = make_model(fmt), make_model(fmt)
    group = dist.new_group(list(range(cp_size)))
    parallel.model.set_context_parallel_group(group, list(range(cp_size)), torch.cuda.Stream(), comm)
    full = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    if "attention_mask" in full:
        del full["attention_mask"]  # no padding in the BSHD batch below
    out = reference(**full)
    loss_ref = out.loss
    loss_ref.backward()

    shard = {k: v.cuda() if torch.is_tensor(v) else v for k, v in shard_batch_for_cp(batch, cp_size, rank).items()}
    targets = torch.tensor(float((batch["labels"][..., 1:] != -100).sum()), device="cuda")
    out_cp = parallel(**shard, num_items_in_batch=targets)  # this rank's summed losses / all targets
    out_cp.loss.backward()
    loss_cp = out_cp.loss.detach().clone()
    dist.all_reduce(loss_cp)
    for p in parallel.parameters():
        dist.all_reduce(p.grad)

    gathered = [torch.empty_like(out_cp.logits) for _ in range(cp_size)]
    dist.all_gather(gathered, out_cp.logits.contiguous())
    logits = torch.empty_like(out.logits)
    for r, part in enumerate(gathered):
        logits[:, torch.from_numpy(cp_shard_indices(bounds, cp_size, r)).cuda()] = part
    grads_ref = torch.cat([p.grad.float().flatten() for p in reference.parameters()])
    grads_cp = torch.cat([p.grad.float().flatten() for p in parallel.parameters()])
    return {
        "logits_cosine": cosine(logits[real.cuda()], out.logits[real.cuda()]),
        "loss_reference": loss_ref.item(),
        "loss_cp": loss_cp.item(),
        "grad_cosine": cosine(grads_cp, grads_ref),
    }


def main():
    """Compare THD and BSHD under each exchange; rank 0 writes the results as JSON."""
    dist.init_process_group("nccl")
    torch.cuda.set_device(dist.get_rank())
    cp_size = dist.get_world_size()
    rng = np.random.default_rng(0)
    seqs = [{"input_ids": rng.integers(4, 256, n)} for n in (37, 128, 5, 90, 300)]
    thd = ThdCollator(pad_token_id=1, pad_sequences_to_be_divisible_by=2 * cp_size)(seqs)
    bounds = thd["cu_seq_lens_q_padded"].numpy()
    real = torch.zeros(thd["input_ids"].shape, dtype=torch.bool)
    for start, length in zip(bounds[:-1], np.diff(thd["cu_seq_lens_q"].numpy())):
        real[0, start : start + length] = True
    bshd = BshdCollator(pad_token_id=1)([{"input_ids": rng.integers(4, 256, 256)} for _ in range(2)])
    every_token = torch.ones(bshd["input_ids"].shape, dtype=torch.bool)
    results = {}
    for comm in ("p2p", "a2a", "all_gather"):
        results[f"thd {comm}"] = compare("thd", comm, thd, bounds, real)
        results[f"bshd {comm}"] = compare("bshd", comm, bshd, np.array([0, 256]), every_token)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
