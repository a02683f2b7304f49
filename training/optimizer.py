"""The optimizer step: AdamW, gradient clipping, and the guard against NaN/Inf updates.

AdamW has optional weight-decay groups; the guard skips (or stops at) updates with a NaN or Inf loss or
gradient norm.

    optimizer = create_optimizer(model, cfg.adamw_kwargs, device, no_decay_on=options.no_decay_on)
    guard = NonFiniteGuard(cfg.on_nonfinite.action, cfg.on_nonfinite.max_consecutive_skips, optimizer)
    grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
    guard.step(step, loss_sum, grad_norm)        # instead of optimizer.step()
"""

import logging

import torch
from omegaconf import OmegaConf

from model.fp8 import is_fp8_tensor

logger = logging.getLogger(__name__)


NO_DECAY_KINDS = ("norms_and_biases", "embeddings")


def decays(name: str, param: torch.nn.Parameter, no_decay_on: tuple[str, ...]) -> bool:
    """Whether a parameter gets weight decay (Megatron's grouping: never 1-D parameters and biases, if asked)."""
    if "norms_and_biases" in no_decay_on and (param.ndim < 2 or name.endswith(".bias")):
        return False
    return not ("embeddings" in no_decay_on and "embed" in name.lower())


def create_optimizer(
    model: torch.nn.Module, adamw_kwargs, device: torch.device, no_decay_on: tuple[str, ...] = ()
) -> torch.optim.Optimizer:
    """AdamW from the `adamw_kwargs` group (fused only on GPUs).

    `no_decay_on` (`config.options.no_decay_on` gathers it from the weight-decay keys): "norms_and_biases"
    and/or "embeddings" go in a second group without weight decay.
    """
    assert set(no_decay_on) <= set(NO_DECAY_KINDS), no_decay_on
    if OmegaConf.is_config(adamw_kwargs):
        adamw_kwargs = OmegaConf.to_container(adamw_kwargs, resolve=True)
    kwargs = dict(adamw_kwargs)
    kwargs["fused"] = kwargs.get("fused", False) and device.type == "cuda"
    if not no_decay_on:
        return torch.optim.AdamW(model.parameters(), **kwargs)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if decays(name, param, no_decay_on) else no_decay).append(param)
    logger.info(
        "Weight decay on %d parameter tensors, none on %d (%s)", len(decay), len(no_decay), " and ".join(no_decay_on)
    )
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **kwargs)


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients (`max_norm` None: only measure) and return the global norm as a plain tensor.

    Under FSDP2 the norm is a DTensor whose `full_tensor()` completes the reduction over ranks.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """The `on_nonfinite` policy for a NaN or Inf loss or gradient norm.

    Skip the update (up to `max_consecutive_skips` in a row, then stop) or stop at once. Never trains on
    silently.

    `step()` replaces `optimizer.step()`. With fused AdamW (the GPU default) the skip happens on the GPU,
    through the optimizer's `found_inf` input (as `GradScaler` uses it: no parameter, moment or step count
    changes), and the verdict is read back one step later, when it is long computed: no per-step stall.
    A warning or a stop therefore comes one step late, but a bad update is never applied. Other
    optimizers are checked at once, which reads two numbers back every step (a sync). Loss and norm
    are global values, so every rank decides the same.
    """

    def __init__(self, action: str, max_consecutive_skips: int, optimizer: torch.optim.Optimizer):
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.optimizer = optimizer
        # TE's FP8 weights (use_quantized_model_init) reject the fused step's `found_inf` input (TE asserts on
        # its keyword arguments), so their NaN/Inf check is the host one.
        fp8_weights = any(is_fp8_tensor(p) for group in optimizer.param_groups for p in group["params"])
        self.on_device = bool(optimizer.defaults.get("fused")) and not fp8_weights
        self.consecutive = 0  # a tensor on the device when `on_device`
        self.pending = None  # (step, [bad, consecutive, loss, grad_norm] on the host, event or None)

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Applies the optimizer's update unless `loss` or `grad_norm` is NaN or Inf."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if not self.on_device:
            if bool(bad):
                self.consecutive += 1
                self._report(step, self.consecutive, loss.item(), grad_norm.item())
            else:
                self.consecutive = 0
                self.optimizer.step()
            return
        self.check()  # the previous step's verdict
        self.optimizer.found_inf = bad.float()
        self.optimizer.step()
        self.consecutive = (self.consecutive + 1) * bad
        values = torch.stack([bad.double(), self.consecutive.double(), loss.double(), grad_norm.double()])
        event = None
        if values.is_cuda:  # a pinned copy that arrives when the GPU gets there, and an event to wait on it
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, values, event)

    def check(self) -> None:
        """Acts on the last verdict not yet read (call once more after the loop)."""
        if self.pending is None:
            return
        step, values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        bad, consecutive, loss, grad_norm = values.tolist()
        if bad:
            self._report(step, int(consecutive), loss, grad_norm)

    def _report(self, step: int, consecutive: int, loss: float, grad_norm: float) -> None:
        what = f"step {step}: loss sum {loss}, gradient norm {grad_norm}"
        if self.action == "stop" or consecutive > self.max_consecutive_skips:
            raise FloatingPointError(
                f"Non-finite values at {what} ({consecutive} such step(s) in a row; on_nonfinite.action="
                f"{self.action}, max_consecutive_skips={self.max_consecutive_skips}). The last complete checkpoint "
                "is untouched: resume from it with a lower adamw_kwargs.lr, max_grad_norm set, or FP8 off."
            )
        logger.warning(
            "Non-finite values at %s: skipped this update (%d in a row; stopping after %d).",
            what,
            consecutive,
            self.max_consecutive_skips,
        )
