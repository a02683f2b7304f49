"""Setup shared by `train_ddp.py` and `train_fsdp2.py`: config checks, process group, model, optimizer,
data, and the loss bookkeeping of one optimizer step. The training loops themselves stay in the scripts."""

import difflib
import itertools
import logging
import os
import random
import socket
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, LlamaForCausalLM

from collator import IGNORE_INDEX
from dataset import create_bshd_dataloader, create_thd_dataloader, resolve_path
from distributed_config import DistributedConfig

logger = logging.getLogger(__name__)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def resolve_use_te(use_te) -> bool:
    """`use_te: null` picks TE where it can run; `true` where it cannot is an error."""
    if use_te is None:
        return te_available()
    if use_te and not te_available():
        raise ValueError(
            "use_te=true needs a CUDA GPU and TransformerEngine, and this machine lacks "
            f"{'a CUDA GPU' if not torch.cuda.is_available() else 'TransformerEngine'}. "
            "Run with use_te=false (the HF reference model) or install TE (see the Dockerfile)."
        )
    return bool(use_te)


# Dictionaries passed on to a library as they are: any key is theirs to accept.
FREE_FORM_KEYS = {"config_kwargs", "dataset.load_dataset_kwargs", "adamw_kwargs", "lr_scheduler_kwargs",
                  "fp8_config.fp8_recipe_kwargs", "wandb_init_args", "hydra"}  # fmt: skip
DEFAULTS_YAML = Path(__file__).resolve().parent / "hydra_config" / "defaults.yaml"


def check_keys_and_types(cfg: dict, defaults: dict, prefix: str = "") -> None:
    """Every key must exist in defaults.yaml (a typo in a tier file or a `+key=` would otherwise be ignored),
    and every value must have its default's type (ints where floats are expected, and null, are accepted)."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in FREE_FORM_KEYS:
            continue
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(
                f"Unknown config key {name!r}{hint} Every key is listed, with what it does, in "
                "hydra_config/defaults.yaml."
            )
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a group of keys (like {sorted(default)}), not {value!r}.")
            check_keys_and_types(value, default, f"{name}.")
        elif default is not None and default != "???" and value is not None:
            expected = type(default)
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            ok = ok or (expected is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                kind = {bool: "true or false", int: "an integer", float: "a number"}.get(expected, "a string")
                example = str(default).lower() if isinstance(default, bool) else default
                raise ValueError(
                    f"{name}={value!r} should be {kind} (the default is {example}); fix the YAML or the override, "
                    f"e.g. {name}={example}."
                )


def validate_config(cfg: DictConfig, use_te: bool, context_parallel: bool = False) -> None:
    """Reject bad values before anything is built; each error names the key and the fix."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(
            f"Required config values are not set: {sorted(missing)}; set them in the YAML or as key=value."
        )
    defaults = OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML), resolve=False)
    check_keys_and_types(OmegaConf.to_container(cfg, resolve=True), defaults)
    positive = ("num_train_steps", "grad_acc_steps", "dataset.micro_batch_size", "dataset.max_seq_length",
                "logger.frequency", "checkpoint.save_every_n_steps", "on_nonfinite.max_consecutive_skips")  # fmt: skip
    for key in positive:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer.")
    if cfg.dataset.num_workers < 0:
        raise ValueError(
            f"dataset.num_workers={cfg.dataset.num_workers} must be 0 (load in the main process) or more."
        )
    if not 0 <= cfg.dataset.stride < cfg.dataset.max_seq_length - 2:
        raise ValueError(
            f"dataset.stride={cfg.dataset.stride} must be at least 0 and below max_seq_length - 2 "
            f"({cfg.dataset.max_seq_length - 2}), or windows would not advance."
        )
    if cfg.cp_size != 1 and not context_parallel:
        raise ValueError(f"cp_size={cfg.cp_size} needs train_fsdp2_cp.py; this entrypoint has no context parallelism.")
    if cfg.on_nonfinite.action not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite.action={cfg.on_nonfinite.action!r} must be 'skip' or 'stop'.")
    if cfg.fp8_config.enabled:
        if not use_te:
            raise ValueError(
                "fp8_config.enabled=true needs the TE model; drop it or set use_te=true on a GPU with TE."
            )
        budget = cfg.dataset.token_micro_batch_size or cfg.dataset.micro_batch_size * cfg.dataset.max_seq_length
        if cfg.use_sequence_packing and budget % 16:
            raise ValueError(
                f"FP8 needs micro-batches whose token count is a multiple of 16, but the THD budget is {budget}; "
                "set dataset.token_micro_batch_size (or max_seq_length) to a multiple of 16."
            )
        from fp8 import build_fp8_recipe  # a recipe this GPU cannot run fails here, naming the GPU it needs

        build_fp8_recipe(cfg.fp8_config.fp8_recipe, cfg.fp8_config.fp8_format, dict(cfg.fp8_config.fp8_recipe_kwargs))
    if not resolve_path(cfg.config_name_or_path).exists() and str(cfg.config_name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"config_name_or_path={cfg.config_name_or_path!r} does not exist; fix the path.")


def init_distributed(dist_config: DistributedConfig) -> torch.device:
    """NCCL on GPUs, gloo on CPUs; a plain `python` run is a group of one."""
    if torch.cuda.is_available():
        device = torch.device("cuda", dist_config.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    init_method = None
    if "MASTER_ADDR" not in os.environ:  # plain `python`: a group of one on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=dist_config.rank,
            world_size=dist_config.world_size,
            device_id=device if backend == "nccl" else None,
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_config(cfg: DictConfig, use_te: bool):
    path = resolve_path(cfg.config_name_or_path)
    kwargs = OmegaConf.to_container(cfg.config_kwargs, resolve=True)
    # Parameters are bf16 on GPUs (TE or the HF reference) unless FSDP2 keeps fp32 master weights; fp32 on CPUs.
    bf16 = torch.cuda.is_available() and not cfg.fp32_master_weights
    kwargs.setdefault("dtype", torch.bfloat16 if bf16 else torch.float32)
    hf_config = AutoConfig.from_pretrained(str(path) if path.exists() else cfg.config_name_or_path, **kwargs)
    if not use_te:
        if cfg.loss_chunk_size:
            logger.warning("loss_chunk_size=%s is a TE-model option; the HF reference model ignores it.",
                           cfg.loss_chunk_size)  # fmt: skip
        hf_config._attn_implementation = "sdpa"
        return hf_config
    from convert import te_config_from_hf

    return te_config_from_hf(
        hf_config,
        attn_input_format="thd" if cfg.use_sequence_packing else "bshd",
        loss_chunk_size=cfg.loss_chunk_size,
    )


def create_model(cfg: DictConfig, use_te: bool, device: torch.device, on_meta: bool):
    """The TE model (the product) or HF `LlamaForCausalLM` (the reference), on `device` or on meta."""
    config = build_model_config(cfg, use_te)
    if use_te:
        from modeling_llama_te import NVLlamaForCausalLM

        with torch.device("meta") if on_meta else nullcontext():
            model = NVLlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config).to(device, dtype=config.dtype)  # the constructor ignores config.dtype
    if cfg.use_gradient_checkpointing:
        if use_te:
            _te_activation_checkpointing(model)
        else:
            model.gradient_checkpointing_enable()
    logger.info(
        "Model: %s (%s), %.1fM parameters, %s",
        type(model).__name__, "TransformerEngine" if use_te else "HF reference, no TE",
        sum(p.numel() for p in model.parameters()) / 1e6, "meta device" if on_meta else device,
    )  # fmt: skip
    return model


def _te_activation_checkpointing(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def create_optimizer(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = OmegaConf.to_container(cfg.adamw_kwargs, resolve=True)
    kwargs["fused"] = kwargs.get("fused", False) and device.type == "cuda"
    if not cfg.no_weight_decay_on_norms_biases_embeddings:
        return torch.optim.AdamW(model.parameters(), **kwargs)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_exempt = param.ndim < 2 or "embed" in name or "norm" in name
        (no_decay if is_exempt else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **kwargs)


def validate_cp_config(cfg: DictConfig, use_te: bool, world_size: int) -> None:
    """Checks of `train_fsdp2_cp.py`: TE, and a world size made of whole context-parallel groups."""
    if not use_te:
        raise ValueError(
            "train_fsdp2_cp.py needs the TE model (context parallelism lives in TE attention): run it on GPUs "
            "with TransformerEngine, or use train_fsdp2.py."
        )
    if not isinstance(cfg.cp_size, int) or cfg.cp_size < 1 or world_size % cfg.cp_size:
        raise ValueError(
            f"cp_size={cfg.cp_size!r} must be a positive integer that divides the number of ranks ({world_size}); "
            "launch a multiple of cp_size processes (torchrun --nproc_per_node=...)."
        )


def create_dataloader(cfg: DictConfig, dist_config: DistributedConfig, cp_size: int = 1, cp_rank: int | None = None):
    """BSHD or THD (`use_sequence_packing`) loader; FP8 pads token counts to multiples of 16. With context
    parallelism every sequence is padded so that it splits into 2 x cp_size equal chunks (of multiples of
    16 tokens per rank with FP8), and with `cp_rank` the loader yields that rank's shards."""
    kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
    kwargs.update(cp_rank=cp_rank, cp_size=cp_size)
    if cfg.fp8_config.enabled:
        kwargs["pad_to_multiple_of"] = 16
    if cp_size > 1:
        divisor = 2 * cp_size * (8 if cfg.fp8_config.enabled else 1)
        if cfg.use_sequence_packing:
            kwargs.update(pad_sequences_to_be_divisible_by=divisor, pad_to_multiple_of=None)
        else:
            kwargs["pad_to_multiple_of"] = divisor
    make = create_thd_dataloader if cfg.use_sequence_packing else create_bshd_dataloader
    return make(dist_config, **kwargs)


def fp8_autocast_factory(cfg: DictConfig, use_te: bool):
    """A no-argument context factory: TE autocast with the configured recipe, or a null context."""
    if not use_te:
        return nullcontext
    import transformer_engine.pytorch as te

    from fp8 import build_fp8_recipe

    recipe = None
    if cfg.fp8_config.enabled:
        recipe = build_fp8_recipe(
            cfg.fp8_config.fp8_recipe, cfg.fp8_config.fp8_format, dict(cfg.fp8_config.fp8_recipe_kwargs)
        )
    return lambda: te.autocast(enabled=recipe is not None, recipe=recipe)


def count_label_tokens(batch: dict) -> torch.Tensor:
    """Tokens that are prediction targets after the model's shift (labels[..., 1:] != -100), or the already
    shifted targets of a context-parallel shard."""
    if "shift_labels" in batch:
        return (batch["shift_labels"] != IGNORE_INDEX).sum()
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to the device; an all-ones attention mask is dropped here, on the CPU, so that the
    model takes the faster unpadded ("causal") path without a GPU sync."""
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_dir_for(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # main(cfg) called without Hydra
            path = Path("outputs") / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run_info(cfg: DictConfig, run_dir: Path, use_te: bool, device: torch.device) -> None:
    """The resolved config and the versions behind this run, once, on rank 0."""
    import datasets
    import transformers

    versions = {
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }
    if use_te:
        import transformer_engine

        versions["transformer_engine"] = transformer_engine.__version__
    info = {"versions": versions, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "run_info.yaml").write_text(OmegaConf.to_yaml(info))


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients (`max_norm` None: only measure) and return the global norm as a plain tensor; under
    FSDP2 the norm is a DTensor whose `full_tensor()` completes the reduction over ranks."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """The `on_nonfinite` policy for a NaN or Inf loss or gradient norm: skip the update (up to
    `max_consecutive_skips` in a row, then stop) or stop at once. Never trains on silently.

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
        self.on_device = bool(optimizer.defaults.get("fused"))
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
            what, consecutive, self.max_consecutive_skips,
        )  # fmt: skip


def iter_batches(dataloader, device: torch.device):
    """The loader's batches, once every rank has shown it has some: a rank without data would otherwise leave
    the others waiting in their next collective until a timeout. (The loader streams endlessly afterwards.)"""
    batches = iter(dataloader)
    first = next(batches, None)
    empty = torch.tensor(float(first is None), device=device)
    if dist.is_initialized():
        dist.all_reduce(empty)
    if empty.item():
        raise ValueError(
            f"{int(empty.item())} of {dist.get_world_size() if dist.is_initialized() else 1} rank(s) got no data: "
            "the data set has fewer records (or files/row groups) than ranks. Use fewer ranks or more data."
        )
    return itertools.chain([first], batches)
