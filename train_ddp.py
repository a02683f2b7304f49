r"""Train Llama 3 with DDP, TransformerEngine layers and FP8 (every rank holds the whole model).

    python train_ddp.py --config-name L0_sanity                                # one process (GPU or CPU)
    torchrun --nproc_per_node=8 train_ddp.py --config-name L1_genomic_1b       # one node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \
        train_ddp.py --config-name L2_lingua_1b                                # several nodes
    python train_ddp.py --config-name L0_sanity fp8_config.enabled=true use_sequence_packing=true \
        checkpoint.ckpt_dir=/tmp/ckpt checkpoint.save_final_model=true         # overrides: key=value

Every key is documented in hydra_config/defaults.yaml. `diff train_ddp.py train_fsdp2.py` shows
only the lines that differ between the two strategies.
"""

import logging
import sys
from contextlib import ExitStack, closing

import hydra
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from transformers import set_seed

from checkpointing.checkpointer import Checkpointer, prepare_checkpoint_dir
from checkpointing.run_record import describe_run, run_dir_for
from config.checks import check_config
from config.command_line import exit_on_user_error, normalize_command_line
from data.batches import count_label_tokens, create_dataloader, iter_batches
from model.build import create_model
from model.cuda_graphs import LayerShape, capture_layer_graphs
from model.fp8 import fp8_autocast_factory, recipe_from_config
from perf_logger import PerfLogger
from runtime.distributed import DistributedConfig, all_reduce_sum, process_group
from runtime.preemption import Preemption
from scheduler import get_cosine_annealing_schedule_with_warmup
from training.optimizer import NonFiniteGuard, clip_grad_norm, create_optimizer
from training.step_hooks import StepHooks
from training.validation_loss import Validator

logger = logging.getLogger(__name__)


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.2")
@exit_on_user_error  # a bad key, value, path or data: one line, exit code 2
def main(cfg: DictConfig) -> float:
    """Train as `cfg` says; returns the last logged loss."""
    dist_config = DistributedConfig()
    logging.basicConfig(level=logging.INFO if dist_config.is_main_process() else logging.WARNING, force=True)
    options = check_config(cfg, entrypoint="ddp")  # every key, value and input, before anything is built
    with ExitStack() as cleanup:  # closes what is set up below in reverse order, also when the run fails
        # --- Distributed setup, checkpoint folder, run folder ---
        device = cleanup.enter_context(process_group(dist_config))
        model_kind = "TE" if options.use_te else "HF reference"
        logger.info("Running the %s model on %s (%d ranks)", model_kind, device, dist_config.world_size)
        set_seed(cfg.seed)
        prepare_checkpoint_dir(cfg.checkpoint, options.model, dist_config.rank, device)  # before anything is built
        run_dir = run_dir_for(cfg.run_dir)  # metrics.jsonl, config.yaml, run_info.yaml, profiler trace, FP8 stats
        hooks = cleanup.enter_context(
            StepHooks(cfg.profiler, cfg.gc_collect_every_n_steps, cfg.fp8_stats_config, run_dir, dist_config.rank)
        )

        # --- Model ---
        model = create_model(options.model, device)  # compiles each decoder layer if use_torch_compile
        hooks.name_layers(model)
        run_info = describe_run(cfg, dist_config.world_size, options.use_te, device, model.config)

        # --- DDP wrapping: the whole model on every rank, gradients all-reduced in buckets ---
        if options.model.on_meta:
            model.init_empty_weights(device)
        # Gradients as views into the all-reduce buckets: no copy of every gradient into a bucket each step.
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

        # --- Optimizer, schedule, data ---
        optimizer = create_optimizer(model, cfg.adamw_kwargs, device, options.no_decay_on)
        scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
        fp8_autocast = fp8_autocast_factory(cfg.fp8_config, options.use_te)
        dataloader, tokenizer = create_dataloader(dist_config, cfg.dataset, options.batches)

        # --- Checkpoints, resume, validation ---
        checkpointer = Checkpointer(
            cfg.checkpoint,
            run_info,
            dist_config.rank,
            strategy="ddp",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            dataloader=dataloader,
            tokenizer=tokenizer,
        )
        step = checkpointer.resume(device)  # the newest complete checkpoint (a damaged one falls back), else 0
        if cfg.use_cuda_graphs:  # after the resume: graphs replay the addresses of the FP8 state it loads
            shape = LayerShape.of(cfg.dataset, cfg.use_sequence_packing, options.batches.token_multiple)
            capture_layer_graphs(model.module, shape, recipe_from_config(cfg.fp8_config))
        validator = None
        if cfg.validation.enabled:  # held-out windows; a new best is exported if asked for
            validator = Validator(
                cfg.validation,
                cfg.dataset,
                options.batches,
                tokenizer,
                dist_config,
                device,
                last_step=cfg.num_train_steps,
                best=checkpointer.best_so_far(),
                on_best=checkpointer.export_best,
            )

        # --- Training loop ---
        # Loss normalisation: each micro-step's loss is its summed token losses divided by the target tokens of
        # the whole optimizer step on all ranks (times world size, because gradient reduction averages over
        # ranks), so every token weighs the same however the tokens fall into micro-batches, ranks and padding
        # (torchtitan's choice; HF's default would be a mean of per-batch means). Gradients are reduced only on
        # the last micro-step (`require_backward_grad_sync`); backward runs outside FP8 autocast, as TE advises.
        perf = cleanup.enter_context(
            PerfLogger(
                dist_config,
                device,
                run_dir,
                model.module.config,
                run_info=run_info,
                frequency=cfg.logger.frequency,
                num_train_steps=cfg.num_train_steps,
                start_step=step,
                wandb_init_args=cfg.wandb_init_args,
            )
        )
        preemption = cleanup.enter_context(Preemption())  # SIGTERM/SIGUSR1: save the current step and exit 0
        guard = NonFiniteGuard(cfg.on_nonfinite.action, cfg.on_nonfinite.max_consecutive_skips, optimizer)
        batches = cleanup.enter_context(closing(iter_batches(dataloader, device, watch=perf.count_batch)))
        last_loss = float("nan")
        model.train()
        while step < cfg.num_train_steps:
            hooks.step_begins(step + 1)
            micro_batches = [next(batches) for _ in range(cfg.grad_acc_steps)]
            num_tokens = all_reduce_sum(sum(count_label_tokens(b) for b in micro_batches).double())
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for i, batch in enumerate(micro_batches):
                model.require_backward_grad_sync = i == len(micro_batches) - 1
                with fp8_autocast():
                    loss = model(**batch, num_items_in_batch=num_tokens / dist_config.world_size).loss
                loss.backward()
                loss_sum += loss.detach() * num_tokens / dist_config.world_size
            grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
            totals = all_reduce_sum(torch.stack([loss_sum, preemption.flag(device)]))  # the stop flag rides along
            guard.step(step + 1, totals[0], grad_norm)  # optimizer.step(), unless NaN/Inf: skip or stop
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            hooks.step_ends(step)  # FP8 statistics, profiler, GC schedule
            stop = preemption.agreed_to_stop(totals[1])  # read one step late: the same step on every rank, no sync
            metrics = perf.log_step(step, totals[0], num_tokens, grad_norm, scheduler.get_last_lr()[0], force=stop)
            last_loss = metrics["loss"] if metrics else last_loss
            if checkpointer.due(step, stop):
                with perf.paused() as pause:  # left out of the window's step time and tokens/s
                    checkpointer.save(step)
                perf.log_event(step=step, checkpoint_save_s=pause["seconds"])
            if validator and validator.due(step):
                with perf.paused():
                    perf.log_event(step=step, **validator.run(model, step))
            if stop:
                logger.warning("Preempted (%s): saved step %d, exiting.", preemption.received or "another rank", step)
                break

        # --- After the loop ---
        guard.check()  # the last step's NaN/Inf verdict
        checkpointer.finish()  # the save in flight, then final_model if checkpoint.save_final_model
    return last_loss


if __name__ == "__main__":
    sys.argv = normalize_command_line(sys.argv)  # upstream keys, free-form groups without +, typos
    main()
