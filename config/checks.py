"""Config checks, run before anything is built: every key known, every value of the right type and range.

    options = check_config(cfg, entrypoint="fsdp2")   # or "ddp", "fsdp2_cp"; what the builders take

Each error is a `ValueError` (or `FileNotFoundError`) that names the key, the value and the fix. Then the
inputs are tried (data paths, tokenizer, model config: small files), so that a typo fails in seconds.
"""

import difflib
import importlib.util
import logging
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from config.command_line import DEFAULTS_YAML, FREE_FORM_GROUPS, upstream_hint
from config.options import Options, options_from
from data.sources import load_tokenizer, local_fasta_files, normalize_load_kwargs
from model.build import build_model_config, te_available
from model.fp8 import build_fp8_recipe
from runtime.distributed import DistributedConfig
from runtime.paths import resolve_path

logger = logging.getLogger(__name__)

# Dictionaries passed on to a library as they are: any key is theirs to accept.
FREE_FORM_KEYS = {*FREE_FORM_GROUPS, "hydra"}
ENTRYPOINTS = ("ddp", "fsdp2", "fsdp2_cp")
# defaults_from -> the tier defaults that stand in for defaults.yaml's
UPSTREAM_DEFAULTS = {"opengenome2": DEFAULTS_YAML.with_name("og2_defaults.yaml")}
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


def check_config(cfg: DictConfig, entrypoint: str) -> Options:
    """Check `cfg` for the entrypoint ("ddp", "fsdp2" or "fsdp2_cp") and try its inputs; what the builders take."""
    use_te = resolve_use_te(cfg.use_te)
    validate_config(cfg, use_te, entrypoint)
    if entrypoint == "fsdp2_cp":
        validate_cp_config(cfg, use_te, DistributedConfig().world_size)
    options = options_from(cfg, use_te)
    check_inputs(cfg, options)
    note_upstream_defaults(cfg)
    return options


def note_upstream_defaults(cfg: DictConfig) -> None:
    """With `defaults_from: opengenome2` (the og2_* tiers), log once which of its defaults replace ours.

    Lists the keys of `og2_defaults.yaml` whose value differs from `defaults.yaml` and that the run did not set
    otherwise, so a user of this recipe's defaults sees what an OG2 tier changes.
    """
    if cfg.defaults_from is None:
        return
    ours = flat_keys(OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML), resolve=False))
    theirs = flat_keys(OmegaConf.to_container(OmegaConf.load(UPSTREAM_DEFAULTS[cfg.defaults_from])))
    changed = [
        f"{key}={value} (ours: {ours[key]})"
        for key, value in theirs.items()
        if key != "defaults_from" and value != ours.get(key) and OmegaConf.select(cfg, key) == value
    ]
    if changed:
        logger.info(
            "defaults_from=%s: its defaults in place of this recipe's: %s.", cfg.defaults_from, ", ".join(changed)
        )


def flat_keys(group: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for key, value in group.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def check_keys_and_types(cfg: dict, defaults: dict, prefix: str = "") -> None:
    """Check that every key exists in defaults.yaml and every value has its default's type.

    A typo in a tier file or a `+key=` would otherwise be ignored. Ints where floats are expected, and
    null, are accepted.
    """
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in FREE_FORM_KEYS:
            continue
        if key not in defaults:
            hint = upstream_hint(name)
            if hint:
                raise ValueError(hint)
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
            _check_type(name, value, default)


def _check_type(name: str, value, default) -> None:
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


def validate_config(cfg: DictConfig, use_te: bool, entrypoint: str = "fsdp2") -> None:
    """Reject bad values before anything is built; each error names the key and the fix.

    `entrypoint` is the script that runs: "ddp", "fsdp2" or "fsdp2_cp" (some keys belong to one strategy).
    """
    assert entrypoint in ENTRYPOINTS, entrypoint
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(
            f"Required config values are not set: {sorted(missing)}; set them in the YAML or as key=value."
        )
    defaults = OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML), resolve=False)
    check_keys_and_types(OmegaConf.to_container(cfg, resolve=True), defaults)
    positive = (
        "num_train_steps",
        "grad_acc_steps",
        "dataset.micro_batch_size",
        "dataset.max_seq_length",
        "logger.frequency",
        "checkpoint.save_every_n_steps",
        "on_nonfinite.max_consecutive_skips",
        "validation.every_n_steps",
        "validation.num_windows",
        "gc_collect_every_n_steps",
        "dataset.data_streams",
        "validation.num_batches",
    )
    # null means: no interval saves (as upstream); Python's automatic GC; one data stream per rank; num_windows
    optional = (
        "checkpoint.save_every_n_steps",
        "gc_collect_every_n_steps",
        "dataset.data_streams",
        "validation.num_batches",
    )
    for key in positive:
        value = OmegaConf.select(cfg, key)
        if key in optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer.")
    if cfg.dataset.num_workers < 0:
        raise ValueError(
            f"dataset.num_workers={cfg.dataset.num_workers} must be 0 (load in the main process) or more."
        )
    if cfg.dataset.max_seq_length < 3:
        raise ValueError(
            f"dataset.max_seq_length={cfg.dataset.max_seq_length} leaves no room for a base between <BOS> and "
            "<EOS>; use a window of at least 3 tokens (8192 in the tier configs)."
        )
    if cfg.dataset.stride < 0:  # one above the window's bases is fine while records fit one window (windows.py)
        raise ValueError(f"dataset.stride={cfg.dataset.stride} must be >= 0 (the overlap between windows).")
    _check_attention_kwargs(cfg)
    _check_precision_kwargs(cfg, use_te)
    if cfg.loss_chunk_size and not use_te:  # here, once: the model config is built twice (check_inputs, the model)
        logger.warning(
            "loss_chunk_size=%s is a TE-model option; the HF reference model ignores it.", cfg.loss_chunk_size
        )
    divisible_by = cfg.dataset.pad_sequences_to_be_divisible_by
    if divisible_by is not None and divisible_by < 1:
        raise ValueError(
            f"dataset.pad_sequences_to_be_divisible_by={divisible_by} must be a positive integer (or null): the "
            "multiple each packed sequence (THD) or each micro-batch's length (BSHD) is padded to."
        )
    lookahead = cfg.dataset.packing_lookahead
    if lookahead and (lookahead < 0 or not cfg.use_sequence_packing or not cfg.dataset.split_samples):
        raise ValueError(
            f"dataset.packing_lookahead={lookahead} balances packed (THD) micro-batches: it needs "
            "use_sequence_packing=true, dataset.split_samples=true and a positive integer (0: off)."
        )
    if cfg.dataset.lowercase_loss_weight < 0:
        raise ValueError(
            f"dataset.lowercase_loss_weight={cfg.dataset.lowercase_loss_weight} must be >= 0 (0: no loss on "
            "soft-masked bases, 0.1: Evo 2's repeat weight, 1: every base alike)."
        )
    if not 0 <= cfg.dataset.reverse_complement_prob <= 1:
        raise ValueError(
            f"dataset.reverse_complement_prob={cfg.dataset.reverse_complement_prob} is a probability: use a number "
            "from 0 (never) to 1 (always the other strand); 0.5 trains both strands equally."
        )
    if cfg.dataset.prefetch_factor < 1:
        raise ValueError(f"dataset.prefetch_factor={cfg.dataset.prefetch_factor} must be a positive integer.")
    if cfg.profiler.enabled and not 1 <= cfg.profiler.start_step <= cfg.profiler.end_step:
        raise ValueError(
            f"profiler.start_step={cfg.profiler.start_step} and profiler.end_step={cfg.profiler.end_step} must "
            "satisfy 1 <= start_step <= end_step (steps count from 1)."
        )
    if cfg.activation_cpu_offload and (not cfg.use_gradient_checkpointing or cfg.use_torch_compile):
        raise ValueError(
            "activation_cpu_offload=true keeps checkpointed layers' inputs on the CPU: it needs "
            f"use_gradient_checkpointing=true (now {cfg.use_gradient_checkpointing}) and runs those layers "
            f"eagerly, so use_torch_compile=false (now {cfg.use_torch_compile})."
        )
    _check_cuda_graphs(cfg, use_te, entrypoint)
    _check_optimizer_numbers(cfg)
    _check_validation(cfg, entrypoint)
    _check_strategy_keys(cfg, entrypoint)
    if cfg.defaults_from is not None and cfg.defaults_from not in UPSTREAM_DEFAULTS:
        raise ValueError(f"defaults_from={cfg.defaults_from!r} must be null or one of {sorted(UPSTREAM_DEFAULTS)}.")
    if cfg.on_nonfinite.action not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite.action={cfg.on_nonfinite.action!r} must be 'skip' or 'stop'.")
    if cfg.fp8_config.enabled:
        _check_fp8(cfg, use_te)
    if cfg.fp8_stats_config.enabled and not (use_te and cfg.fp8_config.enabled):
        raise ValueError(
            "fp8_stats_config.enabled=true logs FP8 tensors: it needs the TE model and fp8_config.enabled=true."
        )
    if not resolve_path(cfg.config_name_or_path).exists() and str(cfg.config_name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"config_name_or_path={cfg.config_name_or_path!r} does not exist; fix the path.")


def _check_validation(cfg: DictConfig, entrypoint: str) -> None:
    if not cfg.validation.enabled:
        if cfg.checkpoint.save_best_model:
            raise ValueError("checkpoint.save_best_model=true needs validation.enabled=true (the best of what?).")
        return
    if entrypoint == "fsdp2_cp":
        raise ValueError("validation.enabled=true is not supported by train_fsdp2_cp.py yet; validate the export.")
    if cfg.validation.load_dataset_kwargs is None and not 0 < cfg.validation.fraction < 1:
        raise ValueError(f"validation.fraction={cfg.validation.fraction} must be between 0 and 1 (e.g. 0.01).")
    for key in ("micro_batch_size", "max_seq_length"):
        value = cfg.validation[key]
        if value is not None and value < (3 if key == "max_seq_length" else 1):
            raise ValueError(
                f"validation.{key}={value} must be a positive integer (3 or more tokens for a window), "
                f"or null for dataset.{key}."
            )
    num_bases = cfg.validation.get("num_bases")
    if num_bases is not None and (not isinstance(num_bases, int) or isinstance(num_bases, bool) or num_bases < 1):
        raise ValueError(f"validation.num_bases={num_bases!r} must be a positive integer (e.g. 1000000), or null.")
    if cfg.validation.stride is not None and cfg.validation.stride < 0:
        raise ValueError(f"validation.stride={cfg.validation.stride} must be >= 0, or null for dataset.stride.")


def _check_cuda_graphs(cfg: DictConfig, use_te: bool, entrypoint: str) -> None:
    """`use_cuda_graphs` where graphs can replay the layers (`model/cuda_graphs.py`), or an error saying why not."""
    if not cfg.use_cuda_graphs:
        return
    why_not = {
        "the TE model (use_te is false or TE is missing)": not use_te,
        "train_ddp.py: FSDP2 gathers each layer's weights into fresh memory every step, and a graph replays "
        "fixed addresses": entrypoint != "ddp",
        "packs of one token count, dataset.split_samples=true, with use_sequence_packing=true": (
            cfg.use_sequence_packing and not cfg.dataset.split_samples
        ),
        "use_gradient_checkpointing=false: recomputing a layer inside its captured backward is not graphed":
            cfg.use_gradient_checkpointing,
        "activation_cpu_offload=false (it copies to and from the host between the layers)": cfg.activation_cpu_offload,
        "use_torch_compile=false (one way of cutting launch time per run)": cfg.use_torch_compile,
        "a CUDA GPU (this machine has none)": not torch.cuda.is_available(),
    }  # fmt: skip
    for needs, missing in why_not.items():
        if missing:
            raise ValueError(f"use_cuda_graphs=true needs {needs}; set use_cuda_graphs=false.")


def _check_optimizer_numbers(cfg: DictConfig) -> None:
    """AdamW and schedule values are passed on as they are: check their types and ranges here."""
    checks = [
        ("adamw_kwargs.lr", lambda v: v > 0, "a positive number, e.g. 3e-4"),
        ("adamw_kwargs.eps", lambda v: v >= 0, "a number >= 0, e.g. 1e-8"),
        ("adamw_kwargs.weight_decay", lambda v: v >= 0, "a number >= 0, e.g. 0.1"),
        ("lr_scheduler_kwargs.min_lr_ratio", lambda v: 0 <= v <= 1, "a number from 0 to 1"),
        ("lr_scheduler_kwargs.num_warmup_steps", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
        ("lr_scheduler_kwargs.num_decay_steps", lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    ]
    for key, ok, expected in checks:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{key}={value!r} must be {expected}.")
    betas = OmegaConf.select(cfg, "adamw_kwargs.betas")
    if betas is not None and not (
        len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"adamw_kwargs.betas={list(betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.95].")


def _check_strategy_keys(cfg: DictConfig, entrypoint: str) -> None:
    if cfg.cp_size != 1 and entrypoint != "fsdp2_cp":
        raise ValueError(f"cp_size={cfg.cp_size} needs train_fsdp2_cp.py; this entrypoint has no context parallelism.")
    if cfg.fp32_master_weights and entrypoint == "ddp":
        raise ValueError(
            "fp32_master_weights=true is an FSDP2 option (fp32 parameters, bf16 compute through "
            "MixedPrecisionPolicy); run train_fsdp2.py, or drop it for train_ddp.py."
        )
    if cfg.checkpoint.async_save and entrypoint == "ddp":  # upstream's default is true: a warning, not an error
        logger.warning("checkpoint.async_save=true is an FSDP2 option (dcp.async_save); DDP saves synchronously.")


def _check_fp8(cfg: DictConfig, use_te: bool) -> None:
    if not use_te:
        raise ValueError("fp8_config.enabled=true needs the TE model; drop it or set use_te=true on a GPU with TE.")
    budget = cfg.dataset.token_micro_batch_size or cfg.dataset.micro_batch_size * cfg.dataset.max_seq_length
    if cfg.use_sequence_packing and budget % 16:
        raise ValueError(
            f"FP8 needs micro-batches whose token count is a multiple of 16, but the THD budget is {budget}; "
            "set dataset.token_micro_batch_size (or max_seq_length) to a multiple of 16."
        )
    # a recipe this GPU cannot run fails here, naming the GPU generation it needs
    build_fp8_recipe(cfg.fp8_config.fp8_recipe, cfg.fp8_config.fp8_format, dict(cfg.fp8_config.fp8_recipe_kwargs))


def validate_cp_config(cfg: DictConfig, use_te: bool, world_size: int) -> None:
    """Check what `train_fsdp2_cp.py` needs: TE, and a world size made of whole context-parallel groups."""
    if not use_te:
        raise ValueError(
            "train_fsdp2_cp.py needs the TE model (context parallelism lives in TE attention): run it on GPUs "
            "with TransformerEngine, or use train_fsdp2.py."
        )
    if cfg.cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type={cfg.cp_comm_type!r} must be one of {list(CP_COMM_TYPES)} (TE's exchanges).")
    if not isinstance(cfg.cp_size, int) or cfg.cp_size < 1 or world_size % cfg.cp_size:
        raise ValueError(
            f"cp_size={cfg.cp_size!r} must be a positive integer that divides the number of ranks ({world_size}); "
            "launch a multiple of cp_size processes (torchrun --nproc_per_node=...)."
        )


def _check_first_last_bf16(cfg: DictConfig) -> None:
    """OpenGenome2's `config_kwargs.fp8_first_last_bf16` and `num_layers_at_start/end_in_bf16`: layer_precision."""
    first_last = OmegaConf.select(cfg, "config_kwargs.fp8_first_last_bf16")
    for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        value = OmegaConf.select(cfg, f"config_kwargs.{key}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"config_kwargs.{key}={value!r} must be an integer >= 0 (layers kept in BF16).")
    if not first_last:
        return
    if OmegaConf.select(cfg, "config_kwargs.layer_precision") is not None:
        raise ValueError(
            "config_kwargs.fp8_first_last_bf16=true and config_kwargs.layer_precision both choose the BF16 layers; "
            "keep one (fp8_first_last_bf16 is layer_precision [null, fp8, ..., fp8, null])."
        )
    if not cfg.fp8_config.enabled:
        logger.warning(
            "config_kwargs.fp8_first_last_bf16=true keeps layers out of FP8, and FP8 is off: it changes "
            "nothing (as upstream)."
        )


def _check_precision_kwargs(cfg: DictConfig, use_te: bool) -> None:
    """Upstream's `config_kwargs.layer_precision` and `use_quantized_model_init`: TE and FP8 options."""
    _check_first_last_bf16(cfg)
    precision = OmegaConf.select(cfg, "config_kwargs.layer_precision")
    quantized = OmegaConf.select(cfg, "config_kwargs.use_quantized_model_init")
    if precision is None and not quantized:
        return
    keys = "config_kwargs.layer_precision" if precision is not None else "config_kwargs.use_quantized_model_init"
    if not use_te:
        raise ValueError(f"{keys} is a TE-model option; drop it or set use_te=true on a GPU with TE.")
    values = list(precision) if precision is not None else []
    if "fp4" in values:
        raise ValueError(
            f"config_kwargs.layer_precision={values} asks for FP4 layers: NVFP4 needs a Blackwell GPU and "
            "fp4_config, which this recipe does not have yet; use 'fp8' or null per layer."
        )
    if ("fp8" in values or quantized) and not cfg.fp8_config.enabled:
        raise ValueError(
            f"{'config_kwargs.use_quantized_model_init=true' if quantized else keys} needs fp8_config.enabled=true "
            "(its FP8 recipe is what the FP8 layers and weights use)."
        )


def _check_attention_kwargs(cfg: DictConfig) -> None:
    """Upstream's `config_kwargs.attn_input_format` and `self_attn_mask_type`: honoured or refused, never ignored.

    Packed batches need thd. BSHD batches run as packed rows in thd by default (`config.options.packs_rows`:
    no work on padding); bshd keeps them padded. The mask must be causal.
    """
    layout = OmegaConf.select(cfg, "config_kwargs.attn_input_format")
    if cfg.use_sequence_packing and layout == "bshd":
        raise ValueError(
            "config_kwargs.attn_input_format='bshd' cannot take packed batches (use_sequence_packing=true): set "
            "use_sequence_packing=false for padded BSHD micro-batches, or drop the key."
        )
    mask = OmegaConf.select(cfg, "config_kwargs.self_attn_mask_type")
    causal = ("causal", "padding_causal", "causal_bottom_right", "padding_causal_bottom_right")
    if mask is not None and mask not in causal:
        raise ValueError(
            f"config_kwargs.self_attn_mask_type={mask!r} is not causal; a language model needs one of {causal} "
            "(or drop the key: padding_causal)."
        )


def check_inputs(cfg: DictConfig, options: Options) -> None:
    """Fail in seconds what would fail after the model is built: data paths, tokenizer, model config.

    Reads the tokenizer and the model config (small files) and checks that local data paths exist; the
    data itself is read later, by the loader.
    """
    sources = [cfg.dataset.load_dataset_kwargs]
    if cfg.validation.enabled and cfg.validation.load_dataset_kwargs is not None:
        sources.append(cfg.validation.load_dataset_kwargs)
    for source in sources:
        kwargs = OmegaConf.to_container(source, resolve=True)
        if not local_fasta_files(kwargs):
            normalize_load_kwargs(kwargs)  # a missing local file or folder is an error here
    load_tokenizer(cfg.dataset.tokenizer_name_or_path)
    build_model_config(options.model)
    mode = (cfg.get("wandb_init_args") or {}).get("mode", "disabled")
    if mode != "disabled" and "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"wandb_init_args.mode={mode} needs wandb, which is not installed: pip install wandb, or "
            "wandb_init_args.mode=disabled (metrics.jsonl in the run folder has every logged metric)."
        )
