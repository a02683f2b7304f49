"""The model the entrypoints train.

Its config, the TE or HF model, activation checkpointing, per-layer `torch.compile`, FSDP2 sharding and
the FP8 autocast context.

    model = create_model(cfg, use_te, device, on_meta=use_te and cfg.use_meta_device)
    fp8_autocast = fp8_autocast_factory(cfg, use_te)
    with fp8_autocast():
        loss = model(**batch).loss

Order (torchtitan's): build -> activation checkpointing -> compile each decoder layer -> FSDP2/DDP wrapping
(`shard_with_fsdp2`, or DDP in `train_ddp.py`) -> materialise meta weights.
"""

import logging
from contextlib import nullcontext

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, LlamaForCausalLM

from perf_logger import count_parameters
from runtime.paths import resolve_path

logger = logging.getLogger(__name__)
# config_kwargs that only the TE model's config has (HF's LlamaConfig would drop them).
TE_CONFIG_KEYS = ("attn_input_format", "self_attn_mask_type", "layer_precision", "use_quantized_model_init")
UNSUPPORTED_HINT = (
    "Upstream's fp8_first_last_bf16 is spelled config_kwargs.layer_precision here (null for a BF16 layer)."
)


def packs_bshd_batches(cfg: DictConfig, use_te: bool) -> bool:
    """Whether the TE model runs BSHD micro-batches as packed rows (`use_sequence_packing=false`, no CP).

    The micro-batches keep their windows (`dataset.micro_batch_size` of them). The model is built for THD;
    one with padding comes as a packed row (the collator lays its windows end to end: pad tokens cost no
    GEMM work), one of equal windows as [B, L] rows, which the model runs in TE's BSHD layout
    (`collator.PackedRowsCollator`). `config_kwargs.attn_input_format=bshd` keeps upstream's padded BSHD path.
    """
    bshd_asked = OmegaConf.select(cfg, "config_kwargs.attn_input_format") == "bshd"
    return use_te and not cfg.use_sequence_packing and cfg.cp_size == 1 and not bshd_asked


def build_model_config(cfg: DictConfig, use_te: bool):
    """The HF config from `config_name_or_path` + `config_kwargs`, turned into an `NVLlamaConfig` for TE."""
    path = resolve_path(cfg.config_name_or_path)
    kwargs = OmegaConf.to_container(cfg.config_kwargs, resolve=True)
    # Parameters are bf16 on GPUs (TE or the HF reference) unless FSDP2 keeps fp32 master weights; fp32 on CPUs.
    bf16 = torch.cuda.is_available() and not cfg.fp32_master_weights
    kwargs.setdefault("dtype", torch.bfloat16 if bf16 else torch.float32)
    te_only = {k: kwargs.pop(k) for k in TE_CONFIG_KEYS if k in kwargs}  # checked by config_checks
    try:
        hf_config, unused = AutoConfig.from_pretrained(str(path) if path.exists() else cfg.config_name_or_path,
                                                       return_unused_kwargs=True, **kwargs)  # fmt: skip
    except OSError as e:  # neither a local folder nor a hub name that can be fetched
        raise FileNotFoundError(
            f"config_name_or_path={cfg.config_name_or_path!r} is not a model config folder here and could not be "
            f"fetched from the hub ({str(e).splitlines()[0]}). Use e.g. ./model_configs/meta-llama/Llama-3.2-1B."
        ) from e
    if unused:  # from_pretrained drops what the config class lacks: say so instead
        raise ValueError(
            f"config_kwargs {sorted(unused)} are not fields of {type(hf_config).__name__} and would do nothing; "
            f"drop them (model fields: e.g. num_hidden_layers, hidden_size, vocab_size). {UNSUPPORTED_HINT}"
        )
    if not use_te:
        hf_config._attn_implementation = "sdpa"
        # Without a KV cache HF's sdpa path reads packed THD batches' position_ids as sequence boundaries; with
        # one (its default), tokens attend across the packed sequences.
        hf_config.use_cache = False
        return hf_config
    from model.convert import te_config_from_hf

    return te_config_from_hf(
        hf_config,
        attn_input_format="thd" if cfg.use_sequence_packing or packs_bshd_batches(cfg, use_te) else "bshd",
        loss_chunk_size=cfg.loss_chunk_size,
        **{k: v for k, v in te_only.items() if k != "attn_input_format"},  # the layout follows the data
    )


def checkpoint_bytes(cfg: DictConfig, use_te: bool) -> int:
    """About the bytes of one checkpoint: parameters and AdamW's two moments, in the parameters' dtype."""
    config = build_model_config(cfg, use_te)
    return 3 * count_parameters(config) * (2 if config.dtype == torch.bfloat16 else 4)


def create_model(cfg: DictConfig, use_te: bool, device: torch.device, on_meta: bool):
    """The TE model (the product) or HF `LlamaForCausalLM` (the reference), on `device` or on meta.

    With `use_gradient_checkpointing` its decoder layers recompute in backward; with `use_torch_compile`
    each decoder layer is compiled. Wrapping (FSDP2, DDP) is the entrypoint's.
    """
    config = build_model_config(cfg, use_te)
    if use_te:
        from model.modeling_llama_te import NVLlamaForCausalLM

        with torch.device("meta") if on_meta else nullcontext(), quantized_init(cfg, config):
            model = NVLlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config).to(device, dtype=config.dtype)  # the constructor ignores config.dtype
    if cfg.use_gradient_checkpointing:
        apply_activation_checkpointing(model, use_te, offload_to_cpu=cfg.activation_cpu_offload)
    if cfg.use_torch_compile:
        compile_decoder_layers(model)
    logger.info(
        "Model: %s (%s), %.1fM parameters, %s%s",
        type(model).__name__, "TransformerEngine" if use_te else "HF reference, no TE",
        sum(p.numel() for p in model.parameters()) / 1e6, "meta device" if on_meta else device,
        ", decoder layers compiled" if cfg.use_torch_compile else "",
    )  # fmt: skip
    return model


def quantized_init(cfg: DictConfig, config):
    """TE's `quantized_model_init` with the run's FP8 recipe when `config_kwargs.use_quantized_model_init`.

    The weights of the FP8 layers are then created as FP8 tensors (no BF16 copy is kept); the model keeps
    the layers that `layer_precision` leaves in BF16 out of it.
    """
    if not config.use_quantized_model_init:
        return nullcontext()
    import transformer_engine.pytorch as te

    from model.fp8 import recipe_from_config

    return te.quantized_model_init(enabled=True, recipe=recipe_from_config(cfg.fp8_config))


def apply_activation_checkpointing(model, use_te: bool, offload_to_cpu: bool = False) -> None:
    """Recompute each decoder layer in backward: `checkpoint_wrapper` around TE layers, HF's own switch.

    With `offload_to_cpu` (`activation_cpu_offload`) each layer's input, the one activation a checkpointed layer
    keeps for its recompute, waits for backward in pinned CPU memory (both models use `checkpoint_wrapper`).
    """
    if not use_te and not offload_to_cpu:
        model.gradient_checkpointing_enable()
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_fn=checkpoint_with_input_on_cpu if offload_to_cpu else None)


def checkpoint_with_input_on_cpu(function, *args, **kwargs):
    """`torch.utils.checkpoint.checkpoint` whose saved inputs go to CPU memory until backward recomputes.

    Non-reentrant checkpointing saves the tensors among `args` through autograd's saved-tensor hooks before it
    runs `function` under its own hooks (which keep nothing), so an outer `save_on_cpu` moves exactly those
    inputs, a [tokens, hidden] activation per layer (2 GiB for a 512k-token window of the 1B body), and none of
    the layer's internals. Their copies wait for the GPU: worth it for long windows only. Keyword arguments
    (rotary embeddings, sequence offsets) stay where they are.
    """
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def shard_with_fsdp2(model, cfg: DictConfig, world_size: int, device: torch.device) -> None:
    """FSDP2 (`fully_shard`): each decoder layer, then the root (embedding, final norm, LM head).

    With `fp32_master_weights` the parameters are kept in FP32 and gathered in BF16. On a single rank the
    gathered parameters stay from forward to backward (`reshard_after_forward=False`): with nothing to gather
    from other ranks, resharding would only copy every layer's parameters again in backward. That holds one
    more copy of the parameters, so with `use_gradient_checkpointing` (memory first) it keeps resharding.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.fp32_master_weights else MixedPrecisionPolicy()  # fmt: skip
    reshard = world_size > 1 or cfg.use_gradient_checkpointing
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)


def compile_decoder_layers(model) -> None:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`).

    In place, so parameter names stay as they are: checkpoints and exports never carry `_orig_mod.`.
    Per layer (not the whole model), as torchtitan does: the layers share one compiled graph, and the
    embedding, the LM head and the loss stay eager. Before FSDP2/DDP wrapping, after activation checkpointing.
    """
    for layer in model.model.layers:
        layer.compile()


def fp8_autocast_factory(cfg: DictConfig, use_te: bool):
    """A no-argument context factory: TE autocast with the configured recipe, or a null context."""
    if not use_te:
        return nullcontext
    import transformer_engine.pytorch as te

    from model.fp8 import recipe_from_config

    recipe = recipe_from_config(cfg.fp8_config) if cfg.fp8_config.enabled else None
    return lambda: te.autocast(enabled=recipe is not None, recipe=recipe)
