"""One log line per interval, the run folder (`metrics.jsonl`, the run record), a tqdm bar on rank 0, wandb.

    perf = PerfLogger(dist_config, device, run_dir, model.config, run_info=run_info, frequency=10, num_train_steps=250)
    batches = iter_batches(dataloader, device, watch=perf.count_batch)   # FLOPs, tokens and data waits
    metrics = perf.log_step(step, loss_sum, num_tokens, grad_norm, lr)  # a dict on log steps, else None

Per-step values stay on the device and are read only on log steps (the loop's NaN/Inf check,
`training.optimizer.NonFiniteGuard`, reads its verdict a step late, without a sync, when the optimizer is
fused AdamW). The logged loss is the token-weighted mean over the interval's steps and all ranks.

MFU = model FLOP/s achieved per GPU / peak dense BF16 FLOP/s of the GPU. Model FLOPs count the work the
batches hold (`ModelFlops`): 6 N per real token (N parameters without the embedding) plus, per layer and
sequence, the causal half of its len x len attention scores: 6 L H D x len^2 over the sequences (L layers,
H heads, D head dim; QK^T and PV, forward and backward). Causal attention kernels skip the upper
triangle, so this is the work done; torchtitan's convention counts the full square (12 L H D len^2) and
passes 100% on long sequences. Packed records count their own attention, not the window's; padding is
not work. FP8 runs are measured against the BF16 peak, so FP8 MFU is "BF16-equivalent".
"""

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from checkpointing.run_record import write_run_files
from model.shape import count_parameters, head_dim_of

logger = logging.getLogger(__name__)

# Peak dense BF16 tensor FLOP/s by device-name fragment (vendor data sheets).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "GB200": 2500e12, "A100": 312e12}


class ModelFlops:
    """Training FLOPs of micro-batches from their real sequence lengths (the convention in the module docstring).

    A packed (THD) batch's sequences are its `cu_seq_lens_q` spans; a BSHD row is one sequence of its
    attention mask's length (the whole row without a mask). Under context parallelism (`cp_size` ranks
    share each sequence) a rank's share is 1 / cp_size of its group's FLOPs.
    """

    def __init__(self, config, cp_size: int = 1):
        self.per_token = 6 * count_parameters(config, with_embedding=False)
        # 4 FLOPs per (query, key) pair and head dim (QK^T, PV) x 3 (forward, backward) / 2 (causal)
        self.per_pair = 6 * config.num_hidden_layers * config.num_attention_heads * head_dim_of(config)
        self.cp_size = cp_size

    def of_batch(self, batch: dict) -> float:
        """This rank's FLOPs for one micro-batch (CPU tensors, before they move to the GPU: no sync)."""
        if "cu_seq_lens_q" in batch:  # THD: the group's whole sequences, shared by its cp_size ranks
            lengths = torch.diff(batch["cu_seq_lens_q"].long()).double()
            return float(self.per_token * lengths.sum() + self.per_pair * (lengths**2).sum()) / self.cp_size
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        local = mask.sum(dim=1).double() if mask is not None else torch.full((ids.shape[0],), float(ids.shape[1]))
        lengths = local * self.cp_size  # a BSHD row holds 1 / cp_size of its sequence on each rank
        return float(self.per_token * local.sum() + self.per_pair * (lengths**2).sum() / self.cp_size)


def peak_flops(device: torch.device) -> float | None:
    """The GPU's peak dense BF16 FLOP/s, or None where unknown (no MFU is logged then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# metrics.jsonl names -> W&B names, as the upstream recipe logs them (dashboards carry over).
WANDB_NAMES = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/learning_rate",
    "step_time_s": "train/step_time",
    "tokens_per_s_per_gpu": "train/tokens_per_second_per_gpu",
    "real_tokens_per_s_per_gpu": "train/unpadded_tokens_per_second_per_gpu",
    "peak_memory_gib": "train/gpu_memory_allocated_max_gb",
    "mfu": "train/mfu",
    "data_wait_fraction": "train/data_wait_fraction",
    "val_loss": "val/loss",
    "val_perplexity": "val/ppl",
    "val_bits_per_base": "val/bits_per_base",
}


def wandb_metrics(values: dict) -> dict:
    """`values` under their W&B names (`train/...`, `val/...`; others as they are), with `train/global_step`."""
    out = {WANDB_NAMES.get(k, k): v for k, v in values.items() if k != "step"}
    if "step" in values:
        out["train/global_step"] = values["step"]
    return out


class PerfLogger:
    """Accumulates per-step values on the device and writes one line per `logger.frequency` steps."""

    def __init__(
        self,
        dist_config,
        device: torch.device,
        run_dir: Path,
        model_config,
        *,
        run_info: dict,
        frequency: int,
        num_train_steps: int,
        start_step: int = 0,
        cp_size: int = 1,
        wandb_init_args=None,
    ):
        """Rank 0 writes `run_info` (`checkpointing.run_record`) and its config into `run_dir`, and starts W&B.

        `frequency`: `logger.frequency`; `wandb_init_args`: that group (no W&B while its mode is "disabled").
        """
        self.is_main = dist_config.is_main_process()
        self.world_size = dist_config.world_size
        self.frequency = frequency
        self.num_train_steps = num_train_steps
        self.device = device
        self.model_flops = ModelFlops(model_config, cp_size)
        self.peak = peak_flops(device)
        self.metrics_path = run_dir / "metrics.jsonl"
        if self.is_main:
            write_run_files(run_dir, run_info)
        self._reset()
        # The bar only in a terminal: in a log file its carriage-return updates would glue onto the log lines.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=num_train_steps, initial=start_step, disable=not (self.is_main and interactive), dynamic_ncols=True
        )
        self.wandb = None
        wandb_init_args = dict(wandb_init_args or {})
        if self.is_main and wandb_init_args.get("mode", "disabled") != "disabled":
            import wandb  # only imported when asked for

            self.wandb = wandb.init(**wandb_init_args, dir=str(run_dir), config=run_info["config"])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def _reset(self):
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.tokens = torch.zeros((), device=self.device, dtype=torch.float64)  # real (label) tokens, all ranks
        self.padded_tokens = 0  # input tokens incl. padding, this rank
        self.data_wait_s = 0.0  # time the loop blocked waiting for the next batches, this rank
        self.flops = 0.0  # model FLOPs of this rank's micro-batches (`count_batch`)
        self.steps = 0
        self.window_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def paused(self):
        """Leave the time inside (a checkpoint save, validation) out of the window; yields {"seconds": it} after.

        On a GPU it first waits for the queued training work, which stays in the window (as Megatron's timers
        stop for evaluation and saves).
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        pause, start = {}, time.perf_counter()
        try:
            yield pause
        finally:
            pause["seconds"] = time.perf_counter() - start
            self.window_start += pause["seconds"]

    def count_batch(self, batch: dict, waited_s: float) -> None:
        """Count a micro-batch's model FLOPs (MFU) and tokens, and the time the loop waited for it.

        `data.batches.iter_batches` calls this with the batch still on the CPU, so counting costs no GPU sync.
        """
        self.flops += self.model_flops.of_batch(batch)
        self.padded_tokens += batch["input_ids"].numel()
        self.data_wait_s += waited_s

    def log_event(self, **values) -> None:
        """A one-off record (a checkpoint's save time, validation figures) in metrics.jsonl, the log and W&B."""
        if self.is_main:
            tqdm.write(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(values) + "\n")
            if self.wandb is not None:
                self.wandb.log(wandb_metrics(values), step=values.get("step"))

    def log_step(self, step: int, loss_sum, num_tokens, grad_norm, lr: float, force: bool = False):
        """Add one step; on log steps, the last step or `force`, reduce the window, write the line, return its metrics.

        `loss_sum`: this step's summed token losses over all ranks; `num_tokens`: their count; `grad_norm`:
        the global norm (`training.optimizer.clip_grad_norm`). Called on every rank.
        """
        force = force or step == self.num_train_steps
        self.loss_sum += loss_sum.detach()
        self.tokens += num_tokens
        self.steps += 1
        self.bar.update(1)
        # Step 1 also gets a line on the console (early feedback), but it is not an event: the first event
        # still covers steps 1..frequency, and metrics.jsonl and W&B see one record per `frequency` steps.
        first_look = step == 1 and self.frequency > 1 and not force
        if step % self.frequency and not first_look and not force:
            return None
        # Read the device values first: the read waits for the GPU to finish the window's queued work, which
        # belongs to this window. (Reading the clock before it left the GPU's tail of every log step out of
        # both windows; the host runs up to a step ahead, so figures were overstated by up to ~15%.)
        real_tokens = self.tokens.item()
        loss = self.loss_sum.item() / max(real_tokens, 1.0)
        grad_norm = float(grad_norm) if grad_norm is not None else None
        elapsed = time.perf_counter() - self.window_start
        metrics = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "step_time_s": elapsed / self.steps,
            "tokens_per_s_per_gpu": self.padded_tokens / elapsed,
            "real_tokens_per_s_per_gpu": real_tokens / self.world_size / elapsed,
            # An upper bound on data stalls: the GPU may still be busy with queued work while the loop waits.
            "data_wait_fraction": self.data_wait_s / elapsed,
        }
        if self.peak:
            metrics["mfu"] = self.flops / elapsed / self.peak
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.is_main:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
            tqdm.write(" | ".join(parts))
        if first_look:
            return metrics
        if self.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.wandb is not None:
                self.wandb.log(wandb_metrics(metrics), step=step)
        self._reset()
        return metrics

    def finish(self):
        """Close the progress bar and the wandb run (also when the run fails: the context manager's exit)."""
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
