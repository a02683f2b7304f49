r"""Train Llama 3 with context parallelism (CP): each sequence is split over `cp_size` GPUs.

FSDP2 shards the model over all GPUs (the flattened data x context mesh), TransformerEngine attention exchanges
keys and values between the CP ranks (`set_context_parallel_group` on every layer).

    torchrun --nproc_per_node=2 train_fsdp2_cp.py --config-name L0_sanity_cp               # cp 2, dp 1
    torchrun --nproc_per_node=8 train_fsdp2_cp.py --config-name L1_genomic_1b cp_size=4 \
        dataset.max_seq_length=65536                                                     # cp 4, dp 2

Needs GPUs with TE. Every key is documented in hydra_config/defaults.yaml; `diff train_fsdp2.py
train_fsdp2_cp.py` shows only the context-parallel lines.
"""

import logging
import sys
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from checkpointing.folders import prepare_checkpoint_dir, resume_from_latest
from checkpointing.format import (
    load_checkpoint_fsdp2,
    save_checkpoint_fsdp2,
    save_final_model,
    wait_for_async_save,
)
from checkpointing.run_record import describe_run, run_dir_for, write_run_info
from checkpointing.upstream import resume_from_upstream
from config.checks import check_inputs, resolve_use_te, validate_config, validate_cp_config
from config.command_line import exit_on_user_error, normalize_command_line
from data.batches import count_label_tokens, create_dataloader, iter_batches, to_device
from model.build import checkpoint_bytes, create_model, fp8_autocast_factory, packs_bshd_batches, shard_with_fsdp2
from perf_logger import PerfLogger
from runtime.distributed import DistributedConfig, all_reduce_sum, init_distributed
from runtime.preemption import Preemption
from scheduler import get_cosine_annealing_schedule_with_warmup
from training.fp8_stats import FP8Stats
from training.gc_schedule import ScheduledGC
from training.optimizer import NonFiniteGuard, clip_grad_norm, create_optimizer
from training.profiling import StepProfiler
from training.validation_loss import Validator, best_so_far

logger = logging.getLogger(__name__)


@hydra.main(config_path="hydra_config", config_name="L0_sanity_cp", version_base="1.2")
@exit_on_user_error  # a bad key, value, path or data: one line, exit code 2
def main(cfg: DictConfig) -> float:
    """Train as `cfg` says; returns the last logged loss."""
    # --- Config and distributed setup ---
    use_te = resolve_use_te(cfg.use_te)
    validate_config(cfg, use_te, entrypoint="fsdp2_cp")
    check_inputs(cfg, use_te)  # data paths, tokenizer and model config, before anything heavy
    dist_config = DistributedConfig()
    validate_cp_config(cfg, use_te, dist_config.world_size)
    device = init_distributed(dist_config)
    logging.basicConfig(level=logging.INFO if dist_config.is_main_process() else logging.WARNING, force=True)
    logger.info(
        "Running the %s model on %s (%d ranks)", "TE" if use_te else "HF reference", device, dist_config.world_size
    )
    set_seed(cfg.seed)

    # --- Checkpoint folder: checked before anything is built (emptied first with checkpoint.overwrite) ---
    ckpt_dir = cfg.checkpoint.ckpt_dir
    if ckpt_dir:
        prepare_checkpoint_dir(cfg.checkpoint, checkpoint_bytes(cfg, use_te), dist_config.rank, device)

    # --- Model ---
    run_dir = run_dir_for(cfg)  # metrics.jsonl, config.yaml, profiler trace, FP8 statistics
    fp8_stats = FP8Stats(cfg, run_dir, dist_config.rank)  # fp8_stats_config: TE's debug tools, before the model
    on_meta = use_te and cfg.use_meta_device
    model = create_model(cfg, use_te, device, on_meta=on_meta)  # compiles each decoder layer if use_torch_compile
    fp8_stats.name_layers(model)
    run_info = describe_run(cfg, dist_config.world_size, use_te, device, model.config)  # goes into every checkpoint

    # --- Context parallelism: ranks [k * cp_size, (k + 1) * cp_size) share sequences; dp = world / cp ---
    cp_mesh = dist.device_mesh.init_device_mesh(
        device.type, (dist_config.world_size // cfg.cp_size, cfg.cp_size), mesh_dim_names=("dp", "cp")
    )
    cp_group, cp_rank = cp_mesh["cp"].get_group(), cp_mesh.get_local_rank("cp")
    model.model.set_context_parallel_group(
        cp_group, dist.get_process_group_ranks(cp_group), torch.cuda.Stream(), cfg.cp_comm_type
    )

    # --- FSDP2 wrapping over every rank (data x context): each decoder layer, then the root ---
    shard_with_fsdp2(model, cfg, dist_config.world_size, device)
    if on_meta:
        model.init_empty_weights(device)  # after sharding: each rank materialises only its shard

    # --- Optimizer and schedule ---
    optimizer = create_optimizer(cfg, model, device)
    scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
    fp8_autocast = fp8_autocast_factory(cfg, use_te)

    # --- Data ---
    # Every data-parallel group reads its own share; the CP ranks of a group read the same batches and
    # each loader yields its rank's part of every sequence (`collator.ContextParallelCollator`).
    data_config = DistributedConfig(cp_mesh.get_local_rank("dp"), dist_config.local_rank, cp_mesh["dp"].size())
    pack_rows = packs_bshd_batches(cfg, use_te)  # cp_size 1, TE, BSHD: padded micro-batches as packed rows
    dataloader, tokenizer = create_dataloader(cfg, data_config, cp_size=cfg.cp_size, cp_rank=cp_rank,
                                              pack_rows=pack_rows)  # fmt: skip
    validation = cfg.validation.enabled  # held-out windows, evaluated every validation.every_n_steps
    validator = Validator(cfg, tokenizer, dist_config, device, best_so_far(ckpt_dir), pack_rows) if validation \
        else None  # fmt: skip

    # --- Resume ---
    step = 0

    def load(path):
        return load_checkpoint_fsdp2(path, model, optimizer, scheduler, dataloader, dist_config.rank)

    if ckpt_dir and cfg.checkpoint.resume_from_checkpoint:  # the newest complete one; a damaged one falls back
        step = resume_from_latest(ckpt_dir, load, device, run_info)  # refuses another shape or packing mode
        # none of ours: the newest of upstream's <ckpt_dir>/train_fsdp2/step_N folders, if any
        step = step or resume_from_upstream(ckpt_dir, "train_fsdp2", model, optimizer, scheduler)

    save_every = cfg.checkpoint.save_every_n_steps  # null: no interval saves (a preempted run still saves)

    def save(step):
        save_checkpoint_fsdp2(ckpt_dir, step, model, optimizer, scheduler, dataloader, dist_config.rank,
                              cfg.checkpoint.max_checkpoints, cfg.checkpoint.async_save, run_info)  # fmt: skip

    def export(name="final_model", **info):  # an HF directory of the current weights (all ranks take part)
        save_final_model(ckpt_dir, model, tokenizer, dist_config.rank, use_te, fsdp2=True,
                         run_info={**run_info, **info}, name=name)  # fmt: skip

    # --- Training loop ---
    # Loss normalisation: each micro-step's loss is its summed token losses divided by the target tokens of
    # the whole optimizer step on all ranks (times world size, because gradient reduction averages over
    # ranks), so every token weighs the same however the tokens fall into micro-batches, ranks and padding
    # (torchtitan's choice; HF's default would be a mean of per-batch means). With CP a rank's targets are
    # its shard's `shift_labels`, and the gradient average runs over all data x context ranks. Gradients are
    # reduced only on the last micro-step (`set_requires_gradient_sync`); backward runs outside FP8 autocast,
    # as TE advises.
    if dist_config.is_main_process():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_run_info(run_dir, run_info)
    perf = PerfLogger(dist_config, cfg, run_dir, model.config, device, step)
    preemption = Preemption()  # SIGTERM/SIGUSR1: save the current step and exit 0
    profiler = StepProfiler(cfg.profiler, run_dir, dist_config.rank)  # profiler.enabled: trace chosen steps
    guard = NonFiniteGuard(cfg.on_nonfinite.action, cfg.on_nonfinite.max_consecutive_skips, optimizer)
    batches = iter_batches(dataloader, device)  # fails clearly if a rank has no data
    gc_schedule = ScheduledGC(cfg.gc_collect_every_n_steps)  # no full GC pass mid-step
    last_loss = float("nan")
    model.train()
    while step < cfg.num_train_steps:
        profiler.step_begins(step + 1)
        wait_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(cfg.grad_acc_steps)]
        perf.add_data_wait(time.perf_counter() - wait_start)
        perf.add_work(micro_batches)  # model FLOPs from the real sequence lengths (MFU)
        micro_batches = [to_device(batch, device) for batch in micro_batches]
        num_tokens = all_reduce_sum(sum(count_label_tokens(b) for b in micro_batches).double())
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with fp8_autocast():
                loss = model(**batch, num_items_in_batch=num_tokens / dist_config.world_size).loss
            loss.backward()
            loss_sum += loss.detach() * num_tokens / dist_config.world_size
        grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
        totals = all_reduce_sum(torch.stack([loss_sum, preemption.flag(device)]))  # the stop flag rides along
        guard.step(step + 1, totals[0], grad_norm)  # optimizer.step(), unless NaN/Inf: skip or stop
        scheduler.step()
        fp8_stats.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        profiler.step_ends(step)
        gc_schedule.step(step)

        stop = preemption.agreed_to_stop(totals[1])  # read one step late: the same step on every rank, no sync
        padded = sum(b["input_ids"].numel() for b in micro_batches)
        lr = scheduler.get_last_lr()[0]
        metrics = perf.log_step(step, totals[0], num_tokens, padded, grad_norm, lr,
                                force=stop or step == cfg.num_train_steps)  # fmt: skip
        last_loss = metrics["loss"] if metrics else last_loss
        if ckpt_dir and (stop or (save_every and step % save_every == 0)):
            with perf.paused() as pause:  # left out of the window's step time and tokens/s
                save(step)
            perf.log_event(step=step, checkpoint_save_s=pause["seconds"])
        if validator and validator.due(step):  # held-out windows; the best one is exported if asked for
            with perf.paused():
                val = validator.run(model)
                if val.pop("improved") and ckpt_dir and cfg.checkpoint.save_best_model:
                    export("best_model", best={"step": step, **val})
            perf.log_event(step=step, **val)
        if stop:
            logger.warning("Preempted (%s): saved step %d, exiting.", preemption.received or "another rank", step)
            break

    # --- Cleanup ---
    guard.check()  # the last step's NaN/Inf verdict
    gc_schedule.close()
    profiler.close()  # if the run stopped before profiler.end_step
    fp8_stats.close()
    if ckpt_dir:
        wait_for_async_save(ckpt_dir, cfg.checkpoint.max_checkpoints, dist_config.rank)
    if ckpt_dir and cfg.checkpoint.save_final_model:
        export()
    perf.finish()
    dist.destroy_process_group()
    return last_loss


if __name__ == "__main__":
    sys.argv = normalize_command_line(sys.argv)  # upstream keys, free-form groups without +, typos
    main()
