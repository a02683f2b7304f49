"""A training script written the upstream recipe's way (its checkpoint.py functions), for test_upstream_checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/upstream_style_fsdp2.py CKPT RUN LAST ASYNC

Resumes from the newest checkpoint in CKPT, trains up to step LAST (the L0_sanity CPU settings of the tests,
the loss token-weighted as the entrypoints weight it), saves every step (in the background if ASYNC=1; at
most 1 kept) and exports CKPT/final_model.
"""

import sys

import torch
from conftest import build_loader, build_model, build_optimizer, make_cfg

import checkpoint
from data.batches import count_label_tokens, iter_batches
from model.parallelize import shard_with_fsdp2
from runtime.distributed import DistributedConfig, all_reduce_sum, process_group
from scheduler import get_cosine_annealing_schedule_with_warmup


def main(ckpt: str, run_dir: str, last: int, async_save: bool) -> None:
    """Resume, train to `last`, save each step, export."""
    cfg = make_cfg(run_dir)
    dist_config = DistributedConfig()
    with process_group(dist_config) as device:
        model = build_model(cfg, device=device)
        shard_with_fsdp2(
            model, dist_config.world_size, device, fp32_master_weights=False, use_gradient_checkpointing=False
        )
        optimizer = build_optimizer(cfg, model)
        scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
        loader, _ = build_loader(cfg, ranks=dist_config)
        model, optimizer, scheduler, loader, start, epoch = checkpoint.load_checkpoint_fsdp2(
            model, optimizer, scheduler, ckpt, dist_config, loader
        )
        print(f"resumed at step {start}, epoch {epoch}", flush=True)
        batches, future = iter_batches(loader, device), None
        for step in range(start, last + 1):
            batch = next(batches)
            tokens = all_reduce_sum(count_label_tokens(batch).double())
            loss = model(**batch, num_items_in_batch=tokens / dist_config.world_size).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if checkpoint.should_save_checkpoint(step, 1):
                if future is not None:
                    future.result()  # one background save at a time
                future = checkpoint.save_checkpoint_fsdp2(
                    model,
                    optimizer,
                    scheduler,
                    ckpt,
                    step,
                    0,
                    dist_config,
                    loader,
                    max_checkpoints=1,
                    async_save=async_save,
                )
        if future is not None:
            future.result()
        checkpoint.save_final_model_fsdp2(model, f"{ckpt}/final_model", dist_config)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
